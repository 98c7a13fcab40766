"""The "Category re-ranking" section of a backbone in the phase-2/4 report: P@1, P@k, MAP@R and mAP without
re-ranking and with each mode (seed 003's hard category mask), the category vote's accuracy, and the reading
that follows from those numbers. Built from metrics.json's "rerank" (pipeline/vectors/rerank_eval.py)."""
from __future__ import annotations

from collections.abc import Mapping

from pipeline.reporting.formatting import fmt, to_float
from pipeline.reporting.readings import rerank_reading

COLUMNS = ("P@1", "P@k", "MAP@R", "mAP")


def _name(row: Mapping) -> str:
    if row.get("mode") == "none":
        return "none (cosine order)"
    if row.get("mode") == "filter":
        return "filter: the predicted category first"
    return f"boost: +{to_float(row.get('boost')):g} to the predicted category's scores"


def rerank_view(metrics: Mapping) -> dict | None:
    """The section's table and reading; None when phase 2 did not measure re-ranking."""
    rerank = metrics.get("rerank")
    if not isinstance(rerank, Mapping) or not rerank.get("rows"):
        return None
    k = rerank.get("k")
    columns = [c.replace("@k", f"@{k}") if k else c for c in COLUMNS]
    rows = [{"name": _name(r), "cells": [fmt(to_float(r.get(c))) for c in COLUMNS]}
            for r in rerank["rows"] if isinstance(r, Mapping)]
    return {"columns": columns, "rows": rows, "reading": rerank_reading(rerank),
            "vote_accuracy": fmt(to_float(rerank.get("vote_accuracy"))), "vote_k": rerank.get("vote_k"),
            "n_queries": fmt(rerank.get("n_queries"))}
