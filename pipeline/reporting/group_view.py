"""The "Groups: originals and their versions" section of a backbone in the phase-2 (and phase-4) report: group
retrieval in both directions, how close each version is to its original against non-matching pairs (cosine,
MSE, MAE, AUC with its bootstrap interval), per role and per class, neighbourhood consistency, and the readings
that follow from those numbers. Built from metrics.json's "groups" (pipeline/vectors/groups.py)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.reporting.formatting import DASH, fmt, fmt_count, get, to_float
from pipeline.reporting.readings import auc_reading, difference_reading, versus_chance

RETRIEVAL_COLUMNS = ("R@1", "R@5", "R@10", "MAP@R", "mAP", "mean_rank", "median_rank")
DIRECTIONS = {"original_to_versions": "original → its versions", "version_to_original": "version → its original"}
MEASURES = {"cosine": "cosine similarity (higher = closer)", "mse": "MSE per dimension (lower = closer)",
            "mae": "MAE per dimension (lower = closer)"}
NEGATIVES = {"random": "random pairs", "same_class": "same-class pairs"}
MAX_CLASS_ROWS = 20
PLOT_TITLES = {
    "closeness": "Cosine similarity of each version with its original (per role) and of non-matching pairs",
    "roc": "ROC: the cosine as the test \u201cis this a version of that original?\u201d",
    "matrix": "Originals × versions (a seeded sample of originals, all their versions)",
    "projections": "2-D projections of whole groups: each original (★) joined to its versions",
}


def _interval(auc: Any) -> str:
    if not isinstance(auc, Mapping) or to_float(auc.get("auc")) is None:
        return DASH
    low, high = (list(auc.get("ci95") or []) + [None, None])[:2]
    if to_float(low) is None or to_float(high) is None:
        return fmt(to_float(auc.get("auc")))
    return f"{fmt(to_float(auc['auc']))} ({fmt(to_float(low))}–{fmt(to_float(high))})"


def _spread(d: Any) -> str:
    if not isinstance(d, Mapping) or to_float(d.get("mean")) is None:
        return DASH
    return f"{fmt(to_float(d['mean']))} ± {fmt(to_float(d.get('std')))}"


def _retrieval_rows(groups: Mapping) -> list[dict]:
    rows = []
    for key, name in DIRECTIONS.items():
        row = get(groups, "retrieval", key)
        if not isinstance(row, Mapping):
            continue
        scored = to_float(row.get("n_queries_evaluated"))
        rows.append({"name": name,
                     "cells": [fmt(to_float(row.get(c)), 1 if c.endswith("rank") else 3) if scored else DASH
                               for c in RETRIEVAL_COLUMNS],
                     "queries": fmt_count(scored), "gallery": fmt_count(row.get("gallery_size")),
                     "without_positive": fmt_count(row.get("n_queries_without_positive"))})
    return rows


def _measure_rows(closeness: Mapping) -> list[dict]:
    rows = []
    for key, name in MEASURES.items():
        measure = get(closeness, "measures", key) or {}
        digits = 3 if key == "cosine" else 5
        rows.append({"name": name,
                     "versions": _spread(measure.get("versions")) if digits == 3 else
                     f"{fmt(to_float(get(measure, 'versions', 'mean')), digits)}",
                     "negatives": [_spread(measure.get(n)) if digits == 3 else
                                   fmt(to_float(get(measure, n, "mean")), digits) for n in NEGATIVES],
                     "auc": [_interval(get(closeness, "auc", n, key)) for n in NEGATIVES]})
    return rows


def _role_rows(closeness: Mapping) -> list[dict]:
    return [{"role": str(r.get("role")), "n": fmt_count(get(r, "cosine", "n")), "cosine": _spread(r.get("cosine")),
             "median": fmt(to_float(get(r, "cosine", "median"))),
             "range": f"{fmt(to_float(get(r, 'cosine', 'q10')))} – {fmt(to_float(get(r, 'cosine', 'q90')))}",
             "mse": fmt(to_float(r.get("mse_mean")), 5), "mae": fmt(to_float(r.get("mae_mean")), 5),
             "auc": _interval(r.get("auc"))}
            for r in closeness.get("per_role") or [] if isinstance(r, Mapping)]


def _class_rows(closeness: Mapping) -> list[dict]:
    entries = [r for r in closeness.get("per_class") or [] if isinstance(r, Mapping)]
    entries.sort(key=lambda r: (to_float(get(r, "cosine", "mean")) or 0.0, str(r.get("class"))))
    return [{"name": str(r.get("class")), "n": fmt_count(get(r, "cosine", "n")), "cosine": _spread(r.get("cosine")),
             "auc": fmt(to_float(r.get("auc")))} for r in entries[:MAX_CLASS_ROWS]]


def _neighbourhood(groups: Mapping) -> list[str]:
    hood = groups.get("neighbourhood") if isinstance(groups.get("neighbourhood"), Mapping) else {}
    k = hood.get("k")
    lines = []
    pair, random = hood.get("original_vs_version") or {}, hood.get("random_pairs") or {}
    if to_float(pair.get("mean")) is not None:
        lines.append(f"An original and its version share {fmt(to_float(pair['mean']))} of their k = {k} nearest "
                     f"neighbours on average ({fmt_count(pair.get('n_pairs'))} pairs), random non-matching pairs "
                     f"{fmt(to_float(random.get('mean')))} ({fmt_count(random.get('n_pairs'))} pairs).")
    before = hood.get("before_after") or {}
    if to_float(before.get("mean")) is not None:
        lines.append(f"Against the embeddings before training ({before.get('base')}), a query keeps "
                     f"{fmt(to_float(before['mean']))} of its k = {k} nearest neighbours on average (median "
                     f"{fmt(to_float(before.get('median')))}, {fmt_count(before.get('n_items'))} queries).")
    return lines


def _readings(groups: Mapping) -> list[str]:
    protocol = groups.get("protocol") or {}
    n_groups = protocol.get("n_groups")
    sentences = [auc_reading(NEGATIVES[name], get(groups, "closeness", "auc", name, "cosine") or {}, n_groups)
                 for name in NEGATIVES]
    forward = get(groups, "retrieval", "original_to_versions") or {}
    gallery, groups_n = to_float(forward.get("gallery_size")), to_float(n_groups)
    if gallery and groups_n and to_float(protocol.get("n_versions")):
        share = to_float(protocol["n_versions"]) / groups_n
        sentences.append(versus_chance("Original → versions R@1", forward.get("R@1"), min(1.0, share / gallery),
                                       forward.get("n_queries_evaluated"),
                                       f"{share:.1f} versions per original among {int(gallery):,}"))
    reverse = get(groups, "retrieval", "version_to_original") or {}
    if to_float(reverse.get("gallery_size")):
        originals = int(to_float(reverse["gallery_size"]))
        sentences.append(versus_chance("Version → original R@1", reverse.get("R@1"), 1 / originals,
                                       reverse.get("n_queries_evaluated"), f"one original of {originals:,}"))
    roles = [r for r in get(groups, "closeness", "per_role", default=[]) or [] if isinstance(r, Mapping)]
    if len(roles) >= 2:
        sentences += [auc_reading("random pairs", r.get("auc") or {}, n_groups, subject=f"{r['role']} versions")
                      for r in roles if isinstance(r.get("auc"), Mapping)]
        ranked = sorted(roles, key=lambda r: to_float(get(r, "cosine", "mean")) or 0.0, reverse=True)
        first, last = ranked[0], ranked[-1]
        sentences.append(difference_reading("cosine with the original", f"{first['role']} versions",
                                            f"{last['role']} versions", first.get("cosine") or {},
                                            last.get("cosine") or {}))
    return [s for s in sentences if s]


def _notes(groups: Mapping) -> list[str]:
    notes = []
    left = get(groups, "protocol", "left_out") or {}
    for key, what in (("groups_without_original", "without an original"),
                      ("groups_with_several_originals", "with several originals"),
                      ("groups_without_versions", "without a version")):
        n = to_float(left.get(key))
        if n:
            notes.append(f"{int(n):,} group{'s' if n != 1 else ''} {what} left out.")
    notes.append("On unit vectors MSE = (2 − 2·cos) / d: it ranks pairs exactly as the cosine does (the same AUC); "
                 "MAE does not.")
    notes += [str(n) for n in groups.get("notes") or []]
    return notes


def group_view(metrics: Mapping, images: Mapping | None) -> dict | None:
    """The section's view, or None for a backbone without groups (the section is then absent). `images`: the
    section's pictures, {"plots": {key: image}, "grids": [image]}, already resolved for the page."""
    groups = metrics.get("groups") if isinstance(metrics, Mapping) else None
    if not isinstance(groups, Mapping):
        return None
    if "retrieval" not in groups:
        return {"note": str(groups.get("note") or "nothing to score")}
    images = images or {}
    plots = [{**image, "title": PLOT_TITLES.get(key, key)} for key, image in (images.get("plots") or {}).items()
             if image]
    protocol = groups.get("protocol") or {}
    closeness = groups.get("closeness") or {}
    return {
        "facts": [("groups scored (originals)", fmt_count(protocol.get("n_groups"))),
                  ("versions scored", fmt_count(protocol.get("n_versions"))),
                  ("gallery: versions / originals", f"{fmt_count(protocol.get('gallery_versions'))} / "
                                                    f"{fmt_count(protocol.get('gallery_originals'))}"),
                  ("non-matching pairs per version", fmt_count(closeness.get("negatives_per_version"))),
                  ("bootstrap resamples (of groups)", fmt_count(protocol.get("bootstrap_samples")))],
        "query_split": str(get(metrics, "protocol", "query_split") or "query"),
        "columns": ["R@1", "R@5", "R@10", "MAP@R", "mAP", "mean rank", "median rank"],
        "retrieval": _retrieval_rows(groups),
        "measures": _measure_rows(closeness),
        "negatives": list(NEGATIVES.values()),
        "roles": _role_rows(closeness),
        "classes": _class_rows(closeness),
        "n_classes": len(closeness.get("per_class") or []),
        "neighbourhood": _neighbourhood(groups),
        "readings": _readings(groups),
        "notes": _notes(groups),
        "plots": plots,
        "grids": [image for image in images.get("grids") or [] if image],
    }
