"""The offline HTML report of phase 2: one page, inline CSS, pictures by relative path.

`render_report` turns the evaluation context (see pipeline/phases/evaluate.py) into a
view model here, in Python, so the template only lays things out: every number
is formatted (formatting.py), every "best" decided (formatting.best_flags) and every
sentence written (readings.py) before Jinja sees it.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Mapping
from urllib.parse import quote

from pipeline.reporting.dataset_view import dataset_view
from pipeline.reporting.formatting import (DASH, best_flags, fmt, fmt_count, fmt_magnitude, fmt_seconds, get,
                                           is_number, render_html, to_float)
from pipeline.reporting.readings import diagnostics_reading, equivalence_text, small_sample_note, without_positive
from pipeline.reporting.group_view import group_view
from pipeline.reporting.rerank_view import rerank_view
from pipeline.reporting.text_view import text_view
from pipeline.vectors.retrieval import SCORE_NAMES

TEMPLATE = "report.html.j2"

KNOWN_VARIANTS = ("unit/cosine", "unit/euclidean", "raw/euclidean")
RETRIEVAL_METRICS = SCORE_NAMES
CLUSTER_METRICS = ("NMI", "ARI")

PLOT_TITLES = {
    "projections": "2-D projections of a stratified sample of the queries",
    "heatmap": "Cosine similarity of a sample, rows and columns sorted by class",
    "pca_variance": "PCA explained variance (per component and cumulative)",
    "norms": "L2 norms of the raw pooled features",
    "k_occurrence": "k-occurrence: how often each item is someone's neighbour (hubness)",
}
# Wide pictures get the full page width; the others share rows two by two.
WIDE_PLOTS = ("projections",)

DIAGNOSTIC_ROWS = (
    # key, label, kind, how to read it
    ("n", "vectors", "count", ""),
    ("dim", "dimension", "count", ""),
    ("norm", "L2 norm: mean ± std", "norm_mean", "unit vectors: exactly 1"),
    ("norm", "L2 norm: min – max", "norm_range", ""),
    ("mean_pairwise_cosine", "mean pairwise cosine", "float", "≈ 0 spread out; > 0.5 narrow cone"),
    ("intra_class_cosine", "intra-class cosine", "float", "higher = tighter classes"),
    ("inter_class_cosine", "inter-class cosine", "float", "lower = classes further apart"),
    ("intra_inter_distance_ratio", "intra / inter distance ratio", "float", "< 1 = class structure; 1 = none"),
    ("effective_rank", "effective rank", "float", "out of the dimension above"),
    ("components_for_90", "PCA components for 90 % variance", "count", ""),
    ("components_for_99", "PCA components for 99 % variance", "count", ""),
    ("hubness_skew", "hubness (skewness of k-occurrence)", "float", "> 1 = strong hubs"),
    ("max_k_occurrence", "max k-occurrence", "count", "mean is k"),
)
# Arrays (and the norm summary handled above) never go in the table.
_DIAGNOSTIC_SKIP = {"pca_explained_variance_ratio", "norm", "k_occurrence"}

DEFINITIONS = {
    "P@1": "Precision at 1: the share of queries whose first result (the query itself excluded under "
           "leave-one-out) has the query's class. Equal scores are ordered by lower gallery index.",
    "P@k": "Precision at k: per query, the share of same-class items among the first k results (k capped "
           "at the gallery size the query sees); averaged over queries.",
    "R@k": "Recall at k as metric-learning papers use it: per query, 1 if at least one positive (a gallery "
           "item of the same class, the query itself excluded) is among the first k results, else 0; "
           "averaged over queries, i.e. a hit rate. It is not the share of all positives retrieved.",
    "mAP": "Mean average precision over the full ranking of the gallery: per query, the average of the "
           "precision at the rank of every positive, computed with scikit-learn's average_precision_score "
           "semantics (items with tied scores enter the ranking together, as one threshold, so AP does not "
           "depend on how ties are ordered); averaged over queries that have at least one positive.",
    "MAP@R": "Mean average precision at R (Musgrave, Belongie & Lim, \u201cA Metric Learning Reality "
             "Check\u201d, ECCV 2020). With R the number of positives of the query, MAP@R = (1/R) \u00b7 "
             "\u03a3\u1d62\u208c\u2081..R P(i)\u00b7rel(i), where P(i) is the precision of the first i results "
             "and rel(i) is 1 when result i is a positive; averaged over queries. It rewards ranking all "
             "positives first, not just one.",
    "R-precision": "Precision at R (same paper): the share of positives among the first R results, R being "
                   "the query's number of positives.",
    "NMI / ARI": "k-means with k = number of classes on the query vectors; the clusters are compared with "
                 "the true classes by normalised mutual information (0 = unrelated, 1 = identical) and the "
                 "adjusted Rand index (0 = chance agreement, 1 = identical, can be negative).",
    "mean pairwise cosine": "The average cosine similarity over all pairs of distinct vectors. Near 0: "
                            "directions spread over the sphere. Large: the vectors occupy a narrow cone "
                            "(anisotropy), and raw cosine values are all high.",
    "effective rank": "Roy & Vetterli (2007): exp of the Shannon entropy of the normalised singular values "
                      "of the centred data. It counts how many dimensions are really used; compare it with "
                      "the dimension.",
    "intra / inter distance ratio": "Mean distance between same-class pairs divided by the mean distance "
                                    "between different-class pairs. Below 1, classes are tighter than the "
                                    "space as a whole; 1 means no class structure.",
    "hubness": "The k-occurrence of an item is how many other items have it among their k nearest "
               "neighbours; its mean is k. The skewness of its distribution measures hubness (Radovanovi\u0107 "
               "et al. 2010): a large positive skew means a few \u201chub\u201d items crowd many neighbour "
               "lists while others are never retrieved.",
}


# --------------------------------------------------------------------------- paths

def _image_src(path: Any, out_dir: Path) -> dict | None:
    """A relative, URL-quoted src for an image, or None when there is nothing usable to link."""
    if not path:
        return None
    text = str(path).replace("\\", "/")
    # Anything with a scheme or a network location would make the report depend
    # on the network; the report must open from a USB stick.
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", text) and not re.match(r"^[a-zA-Z]:/", text) or text.startswith("//"):
        return None
    local = Path(text)
    if local.is_absolute():
        try:
            text = Path(os.path.relpath(local, out_dir)).as_posix()
        except ValueError:  # another drive on Windows: no relative path exists
            return None
    return {"src": quote(text, safe="/-_.~"), "path": text, "exists": (out_dir / text).is_file()}


def _anchor(text: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-").lower() or "section"
    anchor, n = f"bb-{base}", 2
    while anchor in used:
        anchor, n = f"bb-{base}-{n}", n + 1
    used.add(anchor)
    return anchor


# --------------------------------------------------------------------------- metrics

def _metric(row: Mapping, name: str, k: Any) -> Any:
    """Read P@k/R@k whether the evaluation stored them as "P@k" or as "P@5"."""
    if name in row:
        return row[name]
    if name.endswith("@k") and k is not None:
        return row.get(f"{name[:-1]}{k}")
    return None


def _variant_order(retrieval: Mapping) -> list[str]:
    known = [v for v in KNOWN_VARIANTS if v in retrieval]
    return known + [v for v in retrieval if v not in KNOWN_VARIANTS]


def _metric_columns(k: Any) -> list[dict]:
    label_k = str(k) if k is not None else "k"
    columns = []
    for name in RETRIEVAL_METRICS + CLUSTER_METRICS:
        columns.append({"key": name, "label": name.replace("@k", f"@{label_k}")})
    return columns


def _metric_row(metrics: Mapping, variant: str, k: Any) -> dict[str, float | None]:
    row = get(metrics, "retrieval", variant, default={}) or {}
    space = variant.split("/")[0]
    cluster = get(metrics, "clustering", space, default={}) or {}
    values = {name: to_float(_metric(row, name, k)) for name in RETRIEVAL_METRICS}
    values.update({name: to_float(cluster.get(name)) for name in CLUSTER_METRICS})
    return values


def _mark_best(rows: list[dict], columns: list[dict]) -> None:
    """Flag, per column, every cell that shows the best value (formatting.best_flags decides)."""
    for column in columns:
        key = column["key"]
        for r, flag in zip(rows, best_flags([r["values"].get(key) for r in rows])):
            r.setdefault("best", {})[key] = flag


def _cells(row: dict, columns: list[dict]) -> list[dict]:
    return [{"text": fmt(row["values"].get(c["key"])), "best": row.get("best", {}).get(c["key"], False)}
            for c in columns]


def _table_k(backbones: Iterable[Mapping]) -> Any:
    ks = {get(b, "metrics", "protocol", "k") for b in backbones}
    ks.discard(None)
    return ks.pop() if len(ks) == 1 else None


def _diagnostic_value(diag: Mapping, key: str, kind: str) -> str:
    if kind == "norm_mean":
        mean, std = get(diag, "norm", "mean"), get(diag, "norm", "std")
        return DASH if to_float(mean) is None else f"{fmt_magnitude(mean)} ± {fmt_magnitude(std)}"
    if kind == "norm_range":
        low, high = get(diag, "norm", "min"), get(diag, "norm", "max")
        return DASH if to_float(low) is None else f"{fmt_magnitude(low)} – {fmt_magnitude(high)}"
    value = diag.get(key)
    return fmt_count(value) if kind == "count" else fmt(to_float(value) if is_number(value) else value)


def _diagnostics_table(diagnostics: Mapping) -> dict | None:
    spaces = [s for s in ("unit", "raw") if isinstance(diagnostics.get(s), Mapping)]
    spaces += [s for s in diagnostics if s not in spaces and isinstance(diagnostics.get(s), Mapping)]
    if not spaces:
        return None
    rows = []
    known = set()
    for key, label, kind, hint in DIAGNOSTIC_ROWS:
        known.add(key)
        if not any(key in diagnostics[s] for s in spaces):
            continue
        rows.append({"label": label, "hint": hint,
                     "values": [_diagnostic_value(diagnostics[s], key, kind) for s in spaces]})
    # Scalars the evaluation added later still show up, after the known ones.
    extra = []
    for s in spaces:
        for key, value in diagnostics[s].items():
            if key not in known and key not in _DIAGNOSTIC_SKIP and key not in extra \
                    and (is_number(value) or value is None):
                extra.append(key)
    for key in extra:
        rows.append({"label": key.replace("_", " "), "hint": "",
                     "values": [fmt(diagnostics[s].get(key)) for s in spaces]})
    return {"spaces": spaces, "rows": rows}


# --------------------------------------------------------------------------- per class

def _per_class(per_class: Any) -> dict | None:
    if not isinstance(per_class, list) or not per_class:
        return None
    entries = [e for e in per_class if isinstance(e, Mapping)]
    if not entries:
        return None
    metric_keys = []
    for entry in entries:
        for key, value in entry.items():
            if key not in ("class", "n_queries") and key not in metric_keys and (is_number(value) or value is None):
                metric_keys.append(key)
    sort_key = "MAP@R" if "MAP@R" in metric_keys else (metric_keys[0] if metric_keys else None)

    def score(entry: Mapping) -> float:
        value = to_float(entry.get(sort_key)) if sort_key else None
        return value if value is not None else math.inf  # unknown scores sort after every real one

    ordered = sorted(entries, key=score)
    known = [e for e in ordered if score(e) != math.inf]

    def rows(items: Iterable[Mapping]) -> list[dict]:
        return [{"name": fmt(e.get("class")), "n": fmt_count(e.get("n_queries")),
                 "values": [fmt(to_float(e.get(k))) for k in metric_keys]} for e in items]

    tables = []
    if len(entries) <= 20:
        tables.append({"title": f"All {len(entries)} classes, worst {sort_key} first", "rows": rows(ordered)})
    else:
        tables.append({"title": f"Worst 10 classes by {sort_key}", "rows": rows(known[:10])})
        tables.append({"title": f"Best 10 classes by {sort_key}", "rows": rows(list(reversed(known))[:10])})
    return {"metrics": metric_keys, "tables": tables, "n_classes": len(entries)}


# --------------------------------------------------------------------------- backbones

def _backbone_facts(metrics: Mapping) -> tuple[list[tuple[str, str]], str | None]:
    info = get(metrics, "backbone", default={}) or {}
    protocol = get(metrics, "protocol", default={}) or {}
    requested, loaded = info.get("weights"), info.get("weights_loaded")
    warning = None
    if isinstance(loaded, str) and (loaded.lower().startswith("random") or
                                    (requested not in (None, "none") and loaded != requested)):
        warning = (f"Weights requested: {requested}; weights loaded: {loaded}. The numbers below describe "
                   f"that network, not the pretrained one.")
    gallery = protocol.get("gallery_splits")
    facts = [
        ("model", fmt(info.get("name"))),
        ("weights", fmt(loaded if loaded else requested)),
        ("input size", f"{fmt(info.get('image_size'))} px" if info.get("image_size") else DASH),
        ("embedding dimension", fmt_count(info.get("dim"))),
        ("throughput", f"{to_float(info.get('throughput_img_s')):,.1f} images/s"
         if to_float(info.get("throughput_img_s")) is not None else DASH),
        ("queries", f"{fmt(protocol.get('query_split'))} split, {fmt_count(protocol.get('n_queries'))}"
         if protocol else DASH),
        ("gallery", (", ".join(str(g) for g in gallery) if isinstance(gallery, list) else fmt(gallery))
         + f", {fmt_count(protocol.get('gallery_size'))} items" if protocol else DASH),
        ("leave-one-out", fmt(protocol.get("leave_one_out"))),
        ("k", fmt(protocol.get("k"))),
    ]
    return facts, warning


def _backbone_view(entry: Mapping, out_dir: Path, used: set[str]) -> dict:
    metrics = entry.get("metrics") if isinstance(entry.get("metrics"), Mapping) else {}
    tag = str(entry.get("tag") or get(metrics, "backbone", "tag") or "backbone")
    k = get(metrics, "protocol", "k")
    columns = _metric_columns(k)
    retrieval = metrics.get("retrieval") if isinstance(metrics.get("retrieval"), Mapping) else {}
    rows = [{"variant": v, "values": _metric_row(metrics, v, k)} for v in _variant_order(retrieval)]
    _mark_best(rows, columns)
    no_positive = without_positive(retrieval)
    evaluated = [to_float(get(retrieval, v, "n_queries_evaluated")) for v in retrieval]
    evaluated = [n for n in evaluated if n is not None]
    nothing_scored = bool(evaluated) and max(evaluated) == 0
    scoring_note = metrics.get("scoring_note")
    if nothing_scored and not scoring_note:
        scoring_note = "nothing to score: no query has a positive in the gallery"

    diagnostics = metrics.get("diagnostics") if isinstance(metrics.get("diagnostics"), Mapping) else {}
    plots = entry.get("plots") if isinstance(entry.get("plots"), Mapping) else {}
    wide, small = [], []
    for key in list(PLOT_TITLES) + [k_ for k_ in plots if k_ not in PLOT_TITLES]:
        image = _image_src(plots.get(key), out_dir)
        if image:
            image["title"] = PLOT_TITLES.get(key, key.replace("_", " "))
            (wide if key in WIDE_PLOTS else small).append(image)
    grids = []
    for grid in entry.get("grids") or []:
        if isinstance(grid, Mapping):
            image = _image_src(grid.get("path"), out_dir)
            if image:
                image["title"] = str(grid.get("title") or "nearest neighbours")
                grids.append(image)
    timings = metrics.get("timings_s") if isinstance(metrics.get("timings_s"), Mapping) else {}
    facts, warning = _backbone_facts(metrics)
    return {
        "tag": tag,
        "anchor": _anchor(tag, used),
        "facts": facts,
        "warning": warning,
        "columns": columns,
        # A table of dashes says less than the sentence explaining why there is nothing to score.
        "rows": [] if nothing_scored else [{"variant": r["variant"], "cells": _cells(r, columns)} for r in rows],
        "scoring_note": _sentence(scoring_note),
        "sample_note": "" if nothing_scored else small_sample_note(min(evaluated) if evaluated else None),
        "without_positive": "" if nothing_scored else no_positive,
        "equivalence": equivalence_text(metrics) if retrieval else None,
        "diagnostics": _diagnostics_table(diagnostics),
        "reading": diagnostics_reading(diagnostics.get("unit"), diagnostics.get("raw")),
        "plot_notes": [str(n) for n in metrics.get("plot_notes") or []],
        "wide_plots": wide,
        "plots": small,
        "grids": grids,
        "per_class": None if nothing_scored else _per_class(metrics.get("per_class")),
        "text": text_view(metrics, _image_src(entry.get("text_grid"), out_dir)),
        "groups": group_view(metrics, _group_images(entry.get("group_images"), out_dir)),
        "rerank": rerank_view(metrics),
        "timings": " · ".join(f"{name} {fmt_seconds(value)}" for name, value in timings.items()),
    }


def _group_images(images: Any, out_dir: Path) -> dict:
    """The groups section's copied pictures as page images: {"plots": {key: image}, "grids": [image]}."""
    images = images if isinstance(images, Mapping) else {}
    plots = {str(key): _image_src(path, out_dir) for key, path in (images.get("plots") or {}).items()}
    grids = []
    for grid in images.get("grids") or []:
        image = _image_src(grid.get("path"), out_dir) if isinstance(grid, Mapping) else None
        if image:
            grids.append({**image, "title": str(grid.get("title") or "")})
    return {"plots": {key: image for key, image in plots.items() if image}, "grids": grids}


def _sentence(text: Any) -> str:
    text = str(text or "").strip()
    return (text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")) if text else ""


def _comparison(backbones: list[Mapping]) -> dict | None:
    if len(backbones) < 2:
        return None
    k = _table_k(backbones)
    columns = _metric_columns(k)
    rows = []
    for entry in backbones:
        metrics = entry.get("metrics") if isinstance(entry.get("metrics"), Mapping) else {}
        retrieval = metrics.get("retrieval") if isinstance(metrics.get("retrieval"), Mapping) else {}
        tag = str(entry.get("tag") or get(metrics, "backbone", "tag") or "backbone")
        entry_k = get(metrics, "protocol", "k")
        for variant in _variant_order(retrieval):
            rows.append({"tag": tag, "variant": variant, "values": _metric_row(metrics, variant, entry_k)})
    if not rows:
        return None
    _mark_best(rows, columns)
    return {
        "columns": columns,
        "mixed_k": k is None,
        "rows": [{"tag": r["tag"], "variant": r["variant"], "cells": _cells(r, columns)} for r in rows],
    }


def _definitions(option: Any) -> list[tuple[str, str]] | None:
    if option is False or option is None:
        return None
    texts = dict(DEFINITIONS)
    # The evaluation stage may override a definition so that the text always
    # matches the code that computed the number.
    if isinstance(option, Mapping):
        texts.update({str(k): str(v) for k, v in option.items()})
    return list(texts.items())


def build_view(out_dir: Path, context: Mapping) -> dict:
    """Everything the template shows, already formatted (exposed for tests and debugging)."""
    out_dir = Path(out_dir)
    backbones = [b for b in context.get("backbones") or [] if isinstance(b, Mapping)]
    used: set[str] = set()
    sections = [_backbone_view(b, out_dir, used) for b in backbones]
    return {
        "run": fmt(context.get("run")),
        "created": fmt(context.get("created")),
        "command": context.get("command") or "",
        "dataset": dataset_view(context.get("dataset")),
        "comparison": _comparison(backbones),
        "comparison_plot": _image_src(context.get("comparison_plot"), out_dir),
        "backbones": sections,
        "definitions": _definitions(context.get("definitions", True)),
    }


def render_report(out_dir: Path, context: dict) -> Path:
    """Write `out_dir/index.html` atomically and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return render_html(TEMPLATE, build_view(out_dir, context), out_dir / "index.html")
