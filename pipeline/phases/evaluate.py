"""Phase 2: how good is each backbone's embedding space, in numbers and pictures.

For each backbone of phase 1, in `runs/<run>/eval/<tag>/`:
    metrics.json        retrieval metrics (three variants), clustering, diagnostics, per-class scores
    neighbours.csv      top-k neighbours of every query for each variant
    neighbours.json     the same, query-major
    plots/*.png         projections, similarity heatmap, PCA variance, norms, hubness, neighbour grids
and the HTML report `reports/<run>/index.html` over all backbones. For embeddings with a text side
(phase 1 of a CLIP backbone), metrics.json's "text" also holds text → image and image → text retrieval
(item and class relevance) and zero-shot classification (pipeline/vectors/crossmodal.py), with
    text_neighbours.csv the first images of every text query
    plots/grid_text_to_image.png   example text queries and their images
For items in groups with an original and its versions (a manifest's `group` and `role`), metrics.json's
"groups" holds group retrieval (original → its versions, version → its original), the closeness of each
version to its original against non-matching pairs (cosine, MSE, MAE; AUC with a bootstrap interval), per role
and per class, and neighbourhood consistency (an original's and its version's top k; for a trained set, every
query's top k before and after training), computed by pipeline/vectors/groups.py on the query split's groups,
with plots/groups_*.png.

The three variants: unit vectors ranked by cosine similarity and by euclidean
distance (which must agree: ||a-b||² = 2 - 2·cos(a, b) on the unit sphere), and the
raw pooled features ranked by euclidean distance, where norms matter. Two passes, not three:
unit/euclidean is read off unit/cosine, after a real euclidean ranking of a seeded sample of
queries confirmed the identity (metrics.json's "unit_identity"); where it does not hold (vectors
not of unit length) unit/euclidean gets its own full pass. With `evaluate.max_queries` the queries
are a seeded class-stratified sample of the query split (metrics.json's "protocol"."query_sample").

This module reads the artifacts, calls the libraries (pipeline/vectors for the numbers,
pipeline/reporting for pictures, sentences and the page) and writes the results.
"""
from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.config import EvaluateConfig, RunConfig
from pipeline.core import atomic
from pipeline.core.artifacts import (
    evaluation_fingerprint, is_current, load_dataset_meta, load_embeddings, load_text_embeddings,
)
from pipeline.core.errors import PhaseInputError
from pipeline.core.run_dir import RunDir, backbone_tag
from pipeline.data.validate import is_original

__all__ = ["VARIANTS", "evaluate_backbone", "load_embeddings", "evaluation_fingerprint", "run_evaluate"]

log = logging.getLogger("embedlab.evaluate")

# Queries whose unit/euclidean ranking is really computed to check the unit identity.
IDENTITY_SAMPLE = 500

# t-SNE/UMAP (a process of their own) start once retrieval, which keeps both cores busy, is done: from then on the
# main process works mostly on one core and the projections get the other (BENCHMARKS 18: as fast, 300 MB less peak).
PROJECTIONS_BESIDE_RETRIEVAL = False

# variant name -> (which stored array, distance)
VARIANTS = {
    "unit/cosine": ("unit", "cosine"),
    "unit/euclidean": ("unit", "euclidean"),
    "raw/euclidean": ("raw", "euclidean"),
}


def run_evaluate(config: RunConfig, force: bool = False, command: str = "") -> Path:
    from pipeline.reporting.dataset_view import dataset_context
    from pipeline.reporting.figures import report_section
    from pipeline.reporting.plots import plot_metric_bars
    from pipeline.reporting.report import render_report
    from pipeline.phases.ensemble import write_ensembles   # evaluate.ensembles: checked before any set is evaluated

    run_dir = RunDir(config)
    dataset_meta = load_dataset_meta(run_dir)
    report_dir = run_dir.report_dir
    sections = []
    for tag in [*map(backbone_tag, config.extract.backbones), *write_ensembles(run_dir, dataset_meta, False, force)]:
        eval_dir = evaluate_backbone(run_dir, tag, config.evaluate, force=force, dataset_meta=dataset_meta)
        metrics = atomic.read_json(eval_dir / "metrics.json")
        sections.append(report_section(tag, eval_dir, metrics, report_dir))

    comparison_plot = None
    if len(sections) > 1:
        table = {f"{s['tag']} · {variant}": s["metrics"]["retrieval"][variant]
                 for s in sections for variant in ("unit/cosine", "raw/euclidean")}
        path = plot_metric_bars(table, ["P@1", "P@k", "R@k", "mAP", "MAP@R"], report_dir / "img" / "metric_bars.png",
                                "Backbones compared (test queries)")
        comparison_plot = Path(path).relative_to(report_dir).as_posix()

    context = {
        "run": config.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "dataset": dataset_context(run_dir.dataset_dir, dataset_meta, report_dir),
        "comparison_plot": comparison_plot,
        "backbones": sections,
        "definitions": True,
    }
    return Path(render_report(report_dir, context))


def evaluate_backbone(run_dir: RunDir, tag: str, settings: EvaluateConfig, force: bool = False,
                      dataset_meta: dict | None = None) -> Path:
    from pipeline.reporting.figures import make_evaluation_plots, start_projections
    from pipeline.reporting.group_plots import start_group_projection
    from pipeline.reporting.readings import scoring_note
    from pipeline.vectors.diagnostics import clustering_scores, embedding_diagnostics
    from pipeline.vectors.rerank_eval import evaluate_reranking
    from pipeline.vectors.retrieval import retrieve
    from pipeline.vectors.unit_identity import check_unit_identity, euclidean_from_cosine
    from pipeline.phases.evaluate_texts import evaluate_texts

    emb_dir = run_dir.embeddings_dir(tag)
    items, unit, raw, emb_meta = load_embeddings(emb_dir, dataset_meta, run_dir.config.name)
    out = run_dir.eval_dir(tag)
    fingerprint = evaluation_fingerprint(emb_meta, settings)
    metrics_path = out / "metrics.json"
    grouped = bool((items["group"] != "").any())
    # An evaluation written before groups were scored lacks them: it is not up to date for grouped items.
    if not force and is_current(metrics_path, fingerprint) and (not grouped or "groups" in atomic.read_json(
            metrics_path)):
        log.info("phase 2: %s is up to date (use --force to redo)", out)
        return out

    splits = items["split"].to_numpy()
    query_rows = np.flatnonzero(splits == settings.query_split)
    gallery_rows = np.flatnonzero(np.isin(splits, settings.gallery_splits))
    if len(query_rows) == 0:
        raise PhaseInputError(f"{tag}: no embeddings for query split {settings.query_split!r} "
                              f"(splits present: {sorted(set(splits))})")
    if len(gallery_rows) == 0:
        raise PhaseInputError(f"{tag}: no embeddings for gallery split(s) {settings.gallery_splits}")
    labels = items["label"].to_numpy()
    query_rows, query_sample = sample_queries(query_rows, labels, settings)
    position_in_gallery = np.full(len(items), -1, dtype=np.int64)
    position_in_gallery[gallery_rows] = np.arange(len(gallery_rows))
    exclude = position_in_gallery[query_rows]           # leave-one-out where a query is in the gallery
    arrays = {"unit": unit, "raw": raw}

    timings = {}
    started = time.perf_counter()
    early = start_projections(unit, labels, query_rows, settings) if PROJECTIONS_BESIDE_RETRIEVAL else None
    originals = items["role"].map(is_original).to_numpy(bool)
    group_projection = start_group_projection(unit, items, originals, query_rows, settings) if grouped else None

    def rank(variant: str):
        which, metric = VARIANTS[variant]
        x = arrays[which]
        log.info("phase 2: %s %s: %d queries × %d gallery", tag, variant, len(query_rows), len(gallery_rows))
        return retrieve(x[query_rows], labels[query_rows], x[gallery_rows], labels[gallery_rows], metric=metric,
                        k=settings.k, exclude=exclude, chunk_size=settings.chunk_size, progress=True)

    # One pass per distinct ranking: on unit vectors euclidean distance ranks like cosine, so
    # unit/euclidean is read off unit/cosine once a real euclidean ranking of sampled queries agrees.
    results = {"unit/cosine": rank("unit/cosine")}
    identity = check_unit_identity(unit[query_rows], labels[query_rows], unit[gallery_rows], labels[gallery_rows],
                                   results["unit/cosine"], k=settings.k, exclude=exclude,
                                   sample_size=IDENTITY_SAMPLE, seed=settings.seed, chunk_size=settings.chunk_size)
    unit_identity = identity.as_dict()
    if identity.holds:
        results["unit/euclidean"] = euclidean_from_cosine(results["unit/cosine"])
        unit_identity["unit_euclidean"] = "read off unit/cosine"
    else:
        log.warning("phase 2: %s: the unit vectors do not rank alike by cosine and euclidean distance (%d of %d "
                    "sampled queries disagree beyond float rounding): unit/euclidean gets its own pass", tag,
                    identity.n_sampled - identity.n_consistent, identity.n_sampled)
        results["unit/euclidean"] = rank("unit/euclidean")
        unit_identity["unit_euclidean"] = "computed"
    results["raw/euclidean"] = rank("raw/euclidean")
    timings["retrieval"] = time.perf_counter() - started
    projection_rows, projections, plot_notes = early or start_projections(unit, labels, query_rows, settings)
    note = scoring_note(labels[query_rows], labels[gallery_rows], results["unit/cosine"].per_query["n_relevant"],
                        bool((exclude >= 0).any()), settings.query_split)

    started = time.perf_counter()
    with projections.sharing_cores():   # t-SNE/UMAP run beside, in their process
        diagnostics = {which: embedding_diagnostics(arrays[which][gallery_rows], labels[gallery_rows],
                                                    k_occurrence=results[variant].k_occurrence)
                       for which, variant in (("unit", "unit/cosine"), ("raw", "raw/euclidean"))}
        clustering = {which: clustering_scores(arrays[which][query_rows], labels[query_rows], seed=settings.seed)
                      for which in ("unit", "raw") if settings.kmeans}
    timings["diagnostics"] = time.perf_counter() - started

    _write_neighbours(out, items, query_rows, gallery_rows, results)

    started = time.perf_counter()
    plots, grids, drawing_notes = make_evaluation_plots(
        out / "plots", run_dir.dataset_dir, items, unit, raw, query_rows, gallery_rows, results, diagnostics,
        settings, tag, projection_rows, projections.result())
    plot_notes += drawing_notes
    timings["plots"] = time.perf_counter() - started

    class_names = dict(zip(items["label"], items["label_name"]))
    per_query = results["unit/cosine"].per_query
    per_class = []
    for label in np.unique(labels[query_rows]):
        mask = labels[query_rows] == label
        evaluated = mask & ~np.isnan(per_query["P@1"])
        per_class.append({
            "class": class_names.get(label, str(label)), "n_queries": int(mask.sum()),
            "P@1": float(np.mean(per_query["P@1"][evaluated])) if evaluated.any() else None,
            "MAP@R": float(np.mean(per_query["MAP@R"][evaluated])) if evaluated.any() else None,
        })

    metrics = {
        "backbone": {
            "tag": tag, "name": emb_meta["backbone"]["name"], "weights": emb_meta["backbone"]["weights"],
            "weights_loaded": emb_meta["weights_loaded"], "image_size": emb_meta["image_size"],
            "dim": emb_meta["dim"], "throughput_img_s": emb_meta.get("throughput_img_s"),
        },
        "protocol": {
            "query_split": settings.query_split, "gallery_splits": list(settings.gallery_splits),
            "leave_one_out": bool((exclude >= 0).any()), "n_queries": int(len(query_rows)),
            "gallery_size": int(len(gallery_rows)), "k": settings.k, "query_sample": query_sample,
        },
        "retrieval": {variant: r.metrics for variant, r in results.items()},
        # Why there is nothing to score, or why the scores are trivial (None when they mean something).
        "scoring_note": note,
        # From the sampled identity check (unit_identity): the rankings agree up to float rounding,
        # and the share of sampled top-k lists identical index for index.
        "rankings_identical_unit": identity.holds,
        "topk_agreement_unit": identity.n_identical / identity.n_sampled if identity.n_sampled else 1.0,
        "unit_identity": unit_identity,
        "clustering": clustering,
        "diagnostics": diagnostics,
        "per_class": per_class,
        "plots": plots,
        "grids": grids,
        "plot_notes": plot_notes,
        "timings_s": timings,
        "fingerprint": fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if grouped:
        started = time.perf_counter()
        metrics["groups"] = score_groups(run_dir, out, emb_meta, items, unit, originals, query_rows, gallery_rows,
                                            exclude, results["unit/cosine"].neighbours, group_projection, settings,
                                            tag, dataset_meta)
        timings["groups"] = time.perf_counter() - started
    if settings.rerank:
        started = time.perf_counter()
        metrics["rerank"] = evaluate_reranking(unit[query_rows], labels[query_rows], unit[gallery_rows],
                                               labels[gallery_rows], exclude=exclude, settings=settings,
                                               baseline=results["unit/cosine"].metrics)
        timings["rerank"] = time.perf_counter() - started
    texts = load_text_embeddings(emb_dir, items, emb_meta)
    if texts is not None:
        started = time.perf_counter()
        metrics["text"] = evaluate_texts(out, run_dir.dataset_dir, items, unit, texts, query_rows, gallery_rows,
                                         settings, tag)
        timings["text"] = time.perf_counter() - started
    else:
        (out / "text_neighbours.csv").unlink(missing_ok=True)   # of an earlier evaluation of embeddings with texts
    atomic.write_json(metrics_path, metrics)
    row = metrics["retrieval"]["unit/cosine"]
    if row["n_queries_evaluated"] == 0:
        log.warning("phase 2: %s: %s (%d queries)", tag, note, len(query_rows))
    else:
        if note:
            log.warning("phase 2: %s: %s", tag, note)
        log.info("phase 2: %s cosine P@1 %.3f  MAP@R %.3f  mAP %.3f (%d queries)", tag, row["P@1"], row["MAP@R"],
                 row["mAP"], row["n_queries_evaluated"])
    return out


def sample_queries(query_rows: np.ndarray, labels: np.ndarray,
                   settings: EvaluateConfig) -> tuple[np.ndarray, dict | None]:
    """The queries to score and metrics.json's "query_sample": all of them (None) unless
    `max_queries` is set and smaller, then a class-stratified sample seeded by `seed`."""
    from pipeline.vectors.projections import sample_rows

    limit = settings.max_queries
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise PhaseInputError(f"evaluate.max_queries must be a non-negative integer (0 = all), got {limit!r}")
    chosen, drawn = sample_rows(query_rows, labels, limit, settings.seed)
    if drawn:
        log.info("phase 2: %d of %d queries, stratified by class (seed %d)", len(chosen), len(query_rows),
                 settings.seed)
    return chosen, drawn


def score_groups(run_dir: RunDir, out: Path, emb_meta: dict, items, unit: np.ndarray, originals: np.ndarray,
                    query_rows: np.ndarray, gallery_rows: np.ndarray, exclude: np.ndarray, neighbours: np.ndarray,
                    projection, settings: EvaluateConfig, tag: str, dataset_meta: dict | None) -> dict:
    """metrics.json's "groups" (pipeline/vectors/groups.py) and its pictures; {"note": why} when nothing can be
    scored. A trained set (phase 4) is compared with its phase-1 base: every query's top k before and after."""
    from pipeline.reporting.group_plots import draw_group_plots
    from pipeline.vectors import groups

    if not originals.any():
        return {"note": "the items have groups but none has the role 'original' (a manifest's `role` column), so "
                        "no version can be compared with its original"}
    base_tag, base_neighbours = _base_neighbours(run_dir, emb_meta, items, query_rows, gallery_rows, exclude,
                                                 settings, dataset_meta)
    found = groups.evaluate_groups(
        unit, items["group"].to_numpy(str), originals, items["role"].to_numpy(str), items["label_name"].to_numpy(str),
        query_rows, gallery_rows, neighbours=neighbours, base_neighbours=base_neighbours, k=settings.k,
        seed=settings.seed, chunk_size=settings.chunk_size)
    if found is None:
        return {"note": f"no original of the {settings.query_split} split has a version there (with a group of "
                        "exactly one original): nothing to score"}
    result = found.metrics
    if base_tag:
        result["neighbourhood"]["before_after"]["base"] = base_tag
    splits = sorted({settings.query_split, *settings.gallery_splits})
    result["plots"], result["grids"], result["notes"] = draw_group_plots(
        out / "plots", run_dir.dataset_dir, items, found, projection, splits, tag)
    forward, auc = result["retrieval"]["original_to_versions"], result["closeness"]["auc"]["random"]["cosine"]
    log.info("phase 2: %s groups: original → versions R@1 %.3f  MAP@R %.3f; version vs random pair AUC %.3f "
             "± %.3f (%d groups, %d versions)", tag, forward["R@1"], forward["MAP@R"], auc["auc"], auc["se"],
             result["protocol"]["n_groups"], result["protocol"]["n_versions"])
    return result


def _base_neighbours(run_dir: RunDir, emb_meta: dict, items, query_rows: np.ndarray, gallery_rows: np.ndarray,
                     exclude: np.ndarray, settings: EvaluateConfig, dataset_meta: dict | None):
    """(base tag, top-k gallery positions of the queries in the phase-1 space) of a trained set; (None, None) for
    a phase-1 set, or when the base is missing or holds other items."""
    from pipeline.vectors.retrieval import retrieve

    base_tag = emb_meta.get("base_tag")
    if not emb_meta.get("trained") or not base_tag:
        return None, None
    try:
        base_items, base_unit, _, _ = load_embeddings(run_dir.embeddings_dir(base_tag), dataset_meta)
    except PhaseInputError as exc:
        log.warning("phase 2: no before/after neighbourhoods: %s", exc)
        return None, None
    if base_items["id"].tolist() != items["id"].tolist():
        log.warning("phase 2: no before/after neighbourhoods: %s holds other items", base_tag)
        return None, None
    nobody = np.zeros(len(items), dtype=np.int64)   # the neighbour lists are wanted, not the scores
    found = retrieve(base_unit[query_rows], nobody[query_rows], base_unit[gallery_rows], nobody[gallery_rows],
                     k=settings.k, exclude=exclude, chunk_size=settings.chunk_size)
    return base_tag, found.neighbours


def _write_neighbours(out: Path, items, query_rows, gallery_rows, results) -> None:
    import pandas as pd

    ids = items["id"].to_numpy()
    labels = items["label_name"].to_numpy()
    frames = []
    records = [{"query_id": ids[q], "label": labels[q]} for q in query_rows]
    for variant, result in results.items():
        k = result.neighbours.shape[1]
        valid = result.neighbours >= 0
        rows_in_items = np.where(valid, gallery_rows[np.maximum(result.neighbours, 0)], -1)
        q_idx = np.repeat(query_rows, k)
        n_idx = rows_in_items.reshape(-1)
        keep = n_idx >= 0
        frames.append(pd.DataFrame({
            "variant": variant, "query_id": ids[q_idx][keep], "query_label": labels[q_idx][keep],
            "rank": np.tile(np.arange(1, k + 1), len(query_rows))[keep],
            "neighbour_id": ids[n_idx[keep]], "neighbour_label": labels[n_idx[keep]],
            "score": result.neighbour_scores.reshape(-1)[keep],
            "correct": labels[q_idx][keep] == labels[n_idx[keep]],
        }))
        rounded = np.round(result.neighbour_scores.astype(np.float64), 6).tolist()
        for record, row, scores in zip(records, rows_in_items.tolist(), rounded):
            record[variant] = [{"id": ids[r], "label": labels[r], "score": s} for r, s in zip(row, scores) if r >= 0]
    table = pd.concat(frames, ignore_index=True)
    with atomic.atomic_open(out / "neighbours.csv", "w", encoding="utf-8", newline="") as f:
        table.to_csv(f, index=False, float_format="%.6f")
    # json.dumps (ids and labels are str) runs the C encoder; json.dump always the pure-Python one (3x the CPU).
    atomic.write_text(out / "neighbours.json", json.dumps(records))
