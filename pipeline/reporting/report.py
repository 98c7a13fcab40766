"""The offline HTML report of phase 2: one page, inline CSS, pictures by relative path.

`render_report` turns the evaluation context (see pipeline/evaluate.py) into a
view model here, in Python, so the template only lays things out: every number
is formatted, every "best" decided and every sentence written before Jinja sees
it. Jinja autoescapes, so class names, tags and commands cannot inject markup.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import quote

import jinja2

from pipeline.core.atomic import atomic_open

TEMPLATE_DIR = Path(__file__).parent / "templates"
TEMPLATE = "report.html.j2"

KNOWN_VARIANTS = ("unit/cosine", "unit/euclidean", "raw/euclidean")
RETRIEVAL_METRICS = ("P@1", "P@k", "R@k", "mAP", "MAP@R", "R-precision")
CLUSTER_METRICS = ("NMI", "ARI")
DASH = "—"

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


# --------------------------------------------------------------------------- formatting

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) or _numpy_number(value)


def _numpy_number(value: Any) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0 \
        and value.dtype.kind in "iuf"


def _to_float(value: Any) -> float | None:
    if not _is_number(value):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def fmt(value: Any, digits: int = 3) -> str:
    """Three decimals for floats, thousands separators for integers, a dash for NaN/None."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if _is_number(value):
        number = float(value)
        if math.isnan(number) or math.isinf(number):
            return DASH if math.isnan(number) else ("∞" if number > 0 else "−∞")
        if isinstance(value, int) or (_numpy_number(value) and value.dtype.kind in "iu"):
            return f"{int(value):,}"
        return f"{number:.{digits}f}"
    text = str(value)
    return text if text else DASH


def fmt_count(value: Any) -> str:
    number = _to_float(value)
    return DASH if number is None else f"{int(round(number)):,}"


def _seconds(value: Any) -> str:
    number = _to_float(value)
    return DASH if number is None else f"{number:.1f} s"


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

def _get(mapping: Any, *keys: str, default: Any = None) -> Any:
    for key in keys:
        if not isinstance(mapping, Mapping) or key not in mapping:
            return default
        mapping = mapping[key]
    return mapping


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
    row = _get(metrics, "retrieval", variant, default={}) or {}
    space = variant.split("/")[0]
    cluster = _get(metrics, "clustering", space, default={}) or {}
    values = {name: _to_float(_metric(row, name, k)) for name in RETRIEVAL_METRICS}
    values.update({name: _to_float(cluster.get(name)) for name in CLUSTER_METRICS})
    return values


def _mark_best(rows: list[dict], columns: list[dict]) -> None:
    """Flag, per column, every cell that shows the best value (all metrics here: higher is better)."""
    for column in columns:
        key = column["key"]
        shown = [round(r["values"][key], 3) for r in rows if r["values"].get(key) is not None]
        # A column where every row shows the same number has no winner to point at.
        best = max(shown) if len(set(shown)) > 1 else None
        for r in rows:
            value = r["values"].get(key)
            r.setdefault("best", {})[key] = (len(rows) > 1 and best is not None and value is not None
                                             and round(value, 3) == best)


def _cells(row: dict, columns: list[dict]) -> list[dict]:
    return [{"text": fmt(row["values"].get(c["key"])), "best": row.get("best", {}).get(c["key"], False)}
            for c in columns]


def _table_k(backbones: Iterable[Mapping]) -> Any:
    ks = {_get(b, "metrics", "protocol", "k") for b in backbones}
    ks.discard(None)
    return ks.pop() if len(ks) == 1 else None


# --------------------------------------------------------------------------- sentences

def _delta_phrase(name: str, raw: float | None, unit: float | None) -> str | None:
    if raw is None or unit is None:
        return None
    return f"{name} {fmt(raw)} raw vs {fmt(unit)} unit/cosine ({raw - unit:+.3f})"


def _equivalence_text(metrics: Mapping) -> dict:
    identical = metrics.get("rankings_identical_unit")
    agreement = _to_float(metrics.get("topk_agreement_unit"))
    rule = ("On L2-normalised vectors cosine similarity and Euclidean distance rank neighbours identically, "
            "because ‖a − b‖² = 2 − 2·cos(a, b) when ‖a‖ = ‖b‖ = 1.")
    if identical is True:
        check = "This run confirmed it: unit/cosine and unit/euclidean returned the same top-k lists"
        check += f" ({agreement:.1%} of queries identical)." if agreement is not None else "."
        status = "ok"
    elif identical is False:
        check = ("This run did not confirm it: the unit/cosine and unit/euclidean top-k lists differed"
                 + (f" ({agreement:.1%} of queries identical)" if agreement is not None else "")
                 + ". Small differences come from ties and float rounding between near-equal scores; "
                   "large ones mean the vectors were not unit length.")
        status = "warn"
    else:
        check = "This run did not record whether the two rankings matched."
        status = "unknown"

    unit = _get(metrics, "retrieval", "unit/cosine", default={}) or {}
    raw = _get(metrics, "retrieval", "raw/euclidean", default={}) or {}
    parts = [p for p in (_delta_phrase("MAP@R", _to_float(raw.get("MAP@R")), _to_float(unit.get("MAP@R"))),
                         _delta_phrase("P@1", _to_float(raw.get("P@1")), _to_float(unit.get("P@1"))))
             if p]
    if parts:
        d = (_to_float(raw.get("MAP@R")) or 0.0) - (_to_float(unit.get("MAP@R")) or 0.0)
        if abs(d) < 0.0005:
            verdict = "the norms make no measurable difference here"
        elif d < 0:
            verdict = "normalising helps: the norms of the raw features add noise to the ranking"
        else:
            verdict = "the raw norms carry useful information here: normalising costs accuracy"
        raw_text = ("The raw pooled features ranked by Euclidean distance are where the two differ, since their "
                    "norms vary: " + "; ".join(parts) + f" — {verdict}.")
    else:
        raw_text = ("The raw pooled features ranked by Euclidean distance are where the two differ; this run "
                    "has no raw/euclidean row to measure it.")
    return {"rule": rule, "check": check, "status": status, "raw": raw_text}


def diagnostics_reading(unit: Mapping | None, raw: Mapping | None) -> str:
    """One plain-language sentence from the diagnostics numbers (unit vectors first, raw as fallback)."""
    unit = unit or {}
    raw = raw or {}

    def pick(key: str) -> float | None:
        value = _to_float(unit.get(key))
        return value if value is not None else _to_float(raw.get(key))

    parts = []
    cos = pick("mean_pairwise_cosine")
    if cos is not None:
        if cos > 0.5:
            parts.append(f"anisotropic: the vectors fill a narrow cone (mean pairwise cosine {cos:.2f}), so all "
                         f"cosines are high")
        elif cos >= 0.1:
            parts.append(f"moderately concentrated directions (mean pairwise cosine {cos:.2f})")
        elif cos > -0.1:
            parts.append(f"spread out in all directions (mean pairwise cosine {cos:.2f})")
        else:
            parts.append(f"vectors point away from each other (mean pairwise cosine {cos:.2f})")

    rank, dim = pick("effective_rank"), pick("dim")
    if rank is not None and dim:
        share = rank / dim
        tail = (", few dimensions really used" if share < 0.25
                else ", most dimensions used" if share > 0.6 else "")
        parts.append(f"effective rank {rank:.0f} of {dim:.0f} dimensions ({share:.0%}){tail}")

    ratio = pick("intra_inter_distance_ratio")
    if ratio is not None:
        if ratio < 0.8:
            parts.append(f"clear class structure (intra/inter distance ratio {ratio:.2f})")
        elif ratio < 0.95:
            parts.append(f"weak class structure (intra/inter distance ratio {ratio:.2f})")
        else:
            parts.append(f"almost no class structure (intra/inter distance ratio {ratio:.2f})")

    skew = pick("hubness_skew")
    if skew is not None:
        if skew > 1:
            parts.append(f"strong hubness (skew {skew:.2f}): a few items crowd many neighbour lists")
        elif skew > 0.5:
            parts.append(f"moderate hubness (skew {skew:.2f})")
        else:
            parts.append(f"little hubness (skew {skew:.2f})")

    norm_mean, norm_std = _to_float(_get(raw, "norm", "mean")), _to_float(_get(raw, "norm", "std"))
    if norm_mean and norm_std is not None:
        cv = norm_std / norm_mean
        if cv > 0.2:
            parts.append(f"raw norms vary a lot (std/mean {cv:.2f})")

    if not parts:
        return ""
    sentence = "; ".join(parts) + "."
    return sentence[0].upper() + sentence[1:]


def _diagnostic_value(diag: Mapping, key: str, kind: str) -> str:
    if kind == "norm_mean":
        mean, std = _get(diag, "norm", "mean"), _get(diag, "norm", "std")
        return DASH if _to_float(mean) is None else f"{fmt(mean)} ± {fmt(std)}"
    if kind == "norm_range":
        low, high = _get(diag, "norm", "min"), _get(diag, "norm", "max")
        return DASH if _to_float(low) is None else f"{fmt(low)} – {fmt(high)}"
    value = diag.get(key)
    return fmt_count(value) if kind == "count" else fmt(_to_float(value) if _is_number(value) else value)


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
                    and (_is_number(value) or value is None):
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
            if key not in ("class", "n_queries") and key not in metric_keys and (_is_number(value) or value is None):
                metric_keys.append(key)
    sort_key = "MAP@R" if "MAP@R" in metric_keys else (metric_keys[0] if metric_keys else None)

    def score(entry: Mapping) -> float:
        value = _to_float(entry.get(sort_key)) if sort_key else None
        return value if value is not None else math.inf  # unknown scores sort after every real one

    ordered = sorted(entries, key=score)
    known = [e for e in ordered if score(e) != math.inf]

    def rows(items: Iterable[Mapping]) -> list[dict]:
        return [{"name": fmt(e.get("class")), "n": fmt_count(e.get("n_queries")),
                 "values": [fmt(_to_float(e.get(k))) for k in metric_keys]} for e in items]

    tables = []
    if len(entries) <= 20:
        tables.append({"title": f"All {len(entries)} classes, worst {sort_key} first", "rows": rows(ordered)})
    else:
        tables.append({"title": f"Worst 10 classes by {sort_key}", "rows": rows(known[:10])})
        tables.append({"title": f"Best 10 classes by {sort_key}", "rows": rows(list(reversed(known))[:10])})
    return {"metrics": metric_keys, "tables": tables, "n_classes": len(entries)}


# --------------------------------------------------------------------------- dataset

def _ratio(value: Any) -> str:
    # Split ratios are short decimals the user typed (0.8, 0.05); three fixed
    # decimals would only add noise.
    number = _to_float(value)
    return f"{number:g}" if number is not None else fmt(value)


def _ratios_text(ratios: Any) -> str:
    if isinstance(ratios, Mapping):
        return " · ".join(f"{k} {_ratio(v)}" for k, v in ratios.items()) or DASH
    if isinstance(ratios, (list, tuple)):
        return " · ".join(_ratio(v) for v in ratios) or DASH
    return _ratio(ratios)


def _dataset_view(dataset: Any) -> dict | None:
    if not isinstance(dataset, Mapping) or not dataset:
        return None
    classes = [str(c) for c in dataset.get("classes") or []]
    totals = dataset.get("totals") if isinstance(dataset.get("totals"), Mapping) else {}
    counts = dataset.get("counts") if isinstance(dataset.get("counts"), Mapping) else {}
    splits = list(totals) + [s for s in counts if s not in totals]
    split_totals = []
    for split in splits:
        total = totals.get(split)
        if total is None and isinstance(counts.get(split), Mapping):
            total = sum(v for v in counts[split].values() if _is_number(v))
        split_totals.append({"split": str(split), "n": total})
    grand = sum(_to_float(r["n"]) or 0 for r in split_totals)
    for r in split_totals:
        value = _to_float(r["n"])
        r["share"] = f"{value / grand:.1%}" if value is not None and grand else DASH
        r["n"] = fmt_count(r["n"])

    class_rows = []
    if counts:
        names = classes + sorted({str(c) for s in counts.values() if isinstance(s, Mapping) for c in s}
                                 - set(classes))
        for name in names:
            values = []
            for split in splits:
                per_split = counts.get(split) if isinstance(counts.get(split), Mapping) else {}
                values.append(fmt_count(per_split.get(name, 0)))
            class_rows.append({"name": name, "values": values})

    single = [str(c) for c in dataset.get("single_image_classes") or []]
    groups = [g for g in dataset.get("duplicate_groups") or [] if g]
    duplicate_rows = [", ".join(str(x) for x in g) if isinstance(g, (list, tuple)) else str(g) for g in groups]
    facts = [
        ("name", fmt(dataset.get("name"))),
        ("source", fmt(dataset.get("source"))),
        ("split", fmt(dataset.get("split"))),
        ("ratios", _ratios_text(dataset.get("ratios")) if "ratios" in dataset else DASH),
        ("seed", fmt(dataset.get("seed"))),
        ("classes", fmt_count(len(classes)) if classes else DASH),
        ("images kept", fmt_count(dataset.get("n_images"))),
        ("images rejected", fmt_count(dataset.get("n_rejects"))),
    ]
    return {
        "facts": facts, "classes": classes, "splits": [str(s) for s in splits], "split_totals": split_totals,
        "class_rows": class_rows, "single": single, "duplicates": duplicate_rows[:50],
        "n_duplicate_groups": len(duplicate_rows),
        "n_duplicate_items": sum(len(g) for g in groups if isinstance(g, (list, tuple))),
    }


# --------------------------------------------------------------------------- backbones

def _backbone_facts(metrics: Mapping) -> tuple[list[tuple[str, str]], str | None]:
    info = _get(metrics, "backbone", default={}) or {}
    protocol = _get(metrics, "protocol", default={}) or {}
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
        ("throughput", f"{_to_float(info.get('throughput_img_s')):,.1f} images/s"
         if _to_float(info.get("throughput_img_s")) is not None else DASH),
        ("queries", f"{fmt(protocol.get('query_split'))} split, {fmt_count(protocol.get('n_queries'))}"
         if protocol else DASH),
        ("gallery", (", ".join(str(g) for g in gallery) if isinstance(gallery, list) else fmt(gallery))
         + f", {fmt_count(protocol.get('gallery_size'))} items" if protocol else DASH),
        ("leave-one-out", fmt(protocol.get("leave_one_out"))),
        ("k", fmt(protocol.get("k"))),
    ]
    return facts, warning


def _without_positive(retrieval: Mapping) -> str:
    """One sentence on queries that had nothing to find, said once when every variant agrees."""
    counts = {}
    for v in _variant_order(retrieval):
        n = _to_float(_get(retrieval, v, "n_queries_without_positive"))
        if n:
            counts[v] = (int(n), _to_float(_get(retrieval, v, "n_queries_evaluated")))
    if not counts:
        return ""

    def say(n: int, evaluated: float | None) -> str:
        one = n == 1
        text = f"{n:,} quer{'y' if one else 'ies'} had no positive in the gallery and {'was' if one else 'were'} left out"
        return text + (f" ({fmt_count(evaluated)} evaluated)" if evaluated is not None else "")

    if len(set(counts.values())) == 1:
        return say(*next(iter(counts.values()))) + "."
    return " ".join(f"{v}: {say(*c)}." for v, c in counts.items())


def _backbone_view(entry: Mapping, out_dir: Path, used: set[str]) -> dict:
    metrics = entry.get("metrics") if isinstance(entry.get("metrics"), Mapping) else {}
    tag = str(entry.get("tag") or _get(metrics, "backbone", "tag") or "backbone")
    k = _get(metrics, "protocol", "k")
    columns = _metric_columns(k)
    retrieval = metrics.get("retrieval") if isinstance(metrics.get("retrieval"), Mapping) else {}
    rows = [{"variant": v, "values": _metric_row(metrics, v, k)} for v in _variant_order(retrieval)]
    _mark_best(rows, columns)
    without_positive = _without_positive(retrieval)

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
        "rows": [{"variant": r["variant"], "cells": _cells(r, columns)} for r in rows],
        "without_positive": without_positive,
        "equivalence": _equivalence_text(metrics) if retrieval else None,
        "diagnostics": _diagnostics_table(diagnostics),
        "reading": diagnostics_reading(diagnostics.get("unit"), diagnostics.get("raw")),
        "wide_plots": wide,
        "plots": small,
        "grids": grids,
        "per_class": _per_class(metrics.get("per_class")),
        "timings": " · ".join(f"{name} {_seconds(value)}" for name, value in timings.items()),
    }


def _comparison(backbones: list[Mapping]) -> dict | None:
    if len(backbones) < 2:
        return None
    k = _table_k(backbones)
    columns = _metric_columns(k)
    rows = []
    for entry in backbones:
        metrics = entry.get("metrics") if isinstance(entry.get("metrics"), Mapping) else {}
        retrieval = metrics.get("retrieval") if isinstance(metrics.get("retrieval"), Mapping) else {}
        tag = str(entry.get("tag") or _get(metrics, "backbone", "tag") or "backbone")
        entry_k = _get(metrics, "protocol", "k")
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
        "dataset": _dataset_view(context.get("dataset")),
        "comparison": _comparison(backbones),
        "comparison_plot": _image_src(context.get("comparison_plot"), out_dir),
        "backbones": sections,
        "definitions": _definitions(context.get("definitions", True)),
    }


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        autoescape=True,
        # Missing keys render empty instead of aborting a run that took an hour.
        undefined=jinja2.ChainableUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render_report(out_dir: Path, context: dict) -> Path:
    """Write `out_dir/index.html` atomically and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html = _environment().get_template(TEMPLATE).render(**build_view(out_dir, context))
    path = out_dir / "index.html"
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(html)
    return path
