"""Phase 2: how good is each backbone's embedding space, in numbers and pictures.

For each backbone of phase 1, in `runs/<run>/eval/<tag>/`:
    metrics.json        retrieval metrics (three variants), clustering, diagnostics, per-class scores
    neighbours.csv      top-k neighbours of every query for each variant
    neighbours.json     the same, query-major
    plots/*.png         projections, similarity heatmap, PCA variance, norms, hubness, neighbour grids
and the HTML report `reports/<run>/index.html` over all backbones.

The three variants: unit vectors ranked by cosine similarity and by euclidean
distance (which must agree: ||a-b||² = 2 - 2·cos(a, b) on the unit sphere), and the
raw pooled features ranked by euclidean distance, where norms matter.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.core import atomic
from pipeline.config import EvaluateConfig, RunConfig
from pipeline.phases.extract import load_dataset_meta
from pipeline.core.errors import PhaseInputError
from pipeline.core.run_dir import RunDir, backbone_tag, fingerprint_of

log = logging.getLogger("embedlab.evaluate")

# variant name -> (which stored array, distance)
VARIANTS = {
    "unit/cosine": ("unit", "cosine"),
    "unit/euclidean": ("unit", "euclidean"),
    "raw/euclidean": ("raw", "euclidean"),
}
GRID_VARIANTS = {"unit/cosine": "cosine (unit vectors)", "raw/euclidean": "euclidean (raw pooled features)"}


def run_evaluate(config: RunConfig, force: bool = False, command: str = "") -> Path:
    from pipeline.reporting.plots import plot_metric_bars
    from pipeline.reporting.report import render_report

    run_dir = RunDir(config)
    dataset_meta = load_dataset_meta(run_dir)
    report_dir = run_dir.report_dir
    sections = []
    for backbone in config.extract.backbones:
        tag = backbone_tag(backbone)
        eval_dir = evaluate_backbone(run_dir, tag, config.evaluate, force=force)
        metrics = atomic.read_json(eval_dir / "metrics.json")
        sections.append(_report_section(tag, eval_dir, metrics, report_dir))

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
        "dataset": dataset_meta,
        "comparison_plot": comparison_plot,
        "backbones": sections,
        "definitions": True,
    }
    return Path(render_report(report_dir, context))


def _report_section(tag: str, eval_dir: Path, metrics: dict, report_dir: Path) -> dict:
    """Copy a backbone's plots next to the report and point the template at them."""
    img_dir = report_dir / "img" / tag
    img_dir.mkdir(parents=True, exist_ok=True)

    def copy(name: str | None) -> str | None:
        if not name or not (eval_dir / "plots" / name).is_file():
            return None
        shutil.copy2(eval_dir / "plots" / name, img_dir / name)
        return f"img/{tag}/{name}"

    plots = {key: copy(name) for key, name in metrics.get("plots", {}).items()}
    grids = [{"title": g["title"], "path": copy(g["file"])} for g in metrics.get("grids", [])]
    return {"tag": tag, "metrics": metrics, "plots": plots, "grids": [g for g in grids if g["path"]]}



def load_embeddings(emb_dir: Path):
    import pandas as pd

    if not (emb_dir / "meta.json").is_file():
        raise PhaseInputError(f"no finished phase-1 output in {emb_dir}: run `python run.py phase1` first")
    items = pd.read_csv(emb_dir / "items.csv", keep_default_na=False,
                        dtype={"id": str, "split": str, "label_name": str, "path": str, "text": str, "group": str})
    unit = np.load(emb_dir / "embeddings.npy").astype(np.float32, copy=False)
    raw = np.load(emb_dir / "features_raw.npy").astype(np.float32, copy=False)
    if not (len(items) == len(unit) == len(raw)):
        raise PhaseInputError(f"{emb_dir}: items.csv, embeddings.npy and features_raw.npy disagree in length")
    return items, unit, raw, atomic.read_json(emb_dir / "meta.json")


def evaluation_fingerprint(emb_meta: dict, settings: EvaluateConfig) -> str:
    """What a metrics.json was computed from: these embeddings, under these settings."""
    return fingerprint_of({"embeddings": emb_meta.get("fingerprint"), "created": emb_meta.get("created"),
                           "settings": asdict(settings)})


def evaluate_backbone(run_dir: RunDir, tag: str, settings: EvaluateConfig, force: bool = False) -> Path:
    from pipeline.vectors.diagnostics import clustering_scores, embedding_diagnostics
    from pipeline.vectors.retrieval import retrieve

    emb_dir = run_dir.embeddings_dir(tag)
    items, unit, raw, emb_meta = load_embeddings(emb_dir)
    out = run_dir.eval_dir(tag)
    fingerprint = evaluation_fingerprint(emb_meta, settings)
    metrics_path = out / "metrics.json"
    if not force and metrics_path.is_file() and atomic.read_json(metrics_path).get("fingerprint") == fingerprint:
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
    position_in_gallery = np.full(len(items), -1, dtype=np.int64)
    position_in_gallery[gallery_rows] = np.arange(len(gallery_rows))
    exclude = position_in_gallery[query_rows]           # leave-one-out where a query is in the gallery
    labels = items["label"].to_numpy()
    arrays = {"unit": unit, "raw": raw}

    from pipeline.vectors.projections import BackgroundProjections, stratified_sample

    timings = {}
    started = time.perf_counter()
    projection_rows = query_rows[stratified_sample(labels[query_rows], settings.projection_sample, seed=settings.seed)]
    projections = BackgroundProjections(unit[projection_rows], settings.projections if len(projection_rows) >= 5
                                        else [], seed=settings.seed)
    results = {}
    for variant, (which, metric) in VARIANTS.items():
        x = arrays[which]
        log.info("phase 2: %s %s: %d queries × %d gallery", tag, variant, len(query_rows), len(gallery_rows))
        results[variant] = retrieve(x[query_rows], labels[query_rows], x[gallery_rows], labels[gallery_rows],
                                    metric=metric, k=settings.k, exclude=exclude,
                                    chunk_size=settings.chunk_size, progress=True)
    timings["retrieval"] = time.perf_counter() - started
    same = np.all(results["unit/cosine"].neighbours == results["unit/euclidean"].neighbours, axis=1)
    topk_agreement = float(same.mean())

    started = time.perf_counter()
    diagnostics = {
        "unit": embedding_diagnostics(unit[gallery_rows], labels[gallery_rows],
                                      k_occurrence=results["unit/cosine"].k_occurrence),
        "raw": embedding_diagnostics(raw[gallery_rows], labels[gallery_rows],
                                     k_occurrence=results["raw/euclidean"].k_occurrence),
    }
    clustering = {}
    if settings.kmeans:
        clustering = {which: clustering_scores(arrays[which][query_rows], labels[query_rows], seed=settings.seed)
                      for which in ("unit", "raw")}
    timings["diagnostics"] = time.perf_counter() - started

    _write_neighbours(out, items, query_rows, gallery_rows, results)

    started = time.perf_counter()
    plots, grids = _make_plots(out / "plots", run_dir, items, unit, raw, query_rows, gallery_rows, results,
                               diagnostics, settings, tag, projection_rows, projections.result())
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
            "gallery_size": int(len(gallery_rows)), "k": settings.k,
        },
        "retrieval": {variant: r.metrics for variant, r in results.items()},
        "rankings_identical_unit": topk_agreement >= 0.999,
        "topk_agreement_unit": topk_agreement,
        "clustering": clustering,
        "diagnostics": diagnostics,
        "per_class": per_class,
        "plots": plots,
        "grids": grids,
        "timings_s": timings,
        "fingerprint": fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic.write_json(metrics_path, metrics)
    row = metrics["retrieval"]["unit/cosine"]
    log.info("phase 2: %s cosine P@1 %.3f  MAP@R %.3f  mAP %.3f (%d queries)", tag, row["P@1"], row["MAP@R"],
             row["mAP"], row["n_queries_evaluated"])
    return out


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
        for record, row, scores in zip(records, rows_in_items, result.neighbour_scores):
            record[variant] = [{"id": ids[r], "label": labels[r], "score": round(float(s), 6)}
                               for r, s in zip(row, scores) if r >= 0]
    table = pd.concat(frames, ignore_index=True)
    with atomic.atomic_open(out / "neighbours.csv", "w", encoding="utf-8", newline="") as f:
        table.to_csv(f, index=False, float_format="%.6f")
    atomic.write_json(out / "neighbours.json", records, indent=None)


def _make_plots(plot_dir: Path, run_dir: RunDir, items, unit, raw, query_rows, gallery_rows, results,
                diagnostics, settings: EvaluateConfig, tag: str, projection_rows, projections: dict):
    from pipeline.reporting import plots as P
    from pipeline.data.tfrecords import list_shards, load_images
    from pipeline.vectors.projections import stratified_sample

    plot_dir.mkdir(parents=True, exist_ok=True)
    labels = items["label"].to_numpy()
    class_names = [name for _, name in sorted(dict(zip(items["label"], items["label_name"])).items())]
    label_index = {label: i for i, label in enumerate(sorted(set(items["label"])))}
    q_labels = np.array([label_index[v] for v in labels[query_rows]])
    made: dict[str, str] = {}

    for name, value in list(projections.items()):
        if isinstance(value, str):
            log.warning("phase 2: %s projection skipped: %s", name, value)
            del projections[name]
    if projections:
        p_labels = np.array([label_index[v] for v in labels[projection_rows]])
        P.plot_projections_grid(projections, p_labels, class_names,
                                f"{tag}: test embeddings ({len(projection_rows)} points)", plot_dir / "projections.png")
        made["projections"] = "projections.png"
    heat = stratified_sample(q_labels, settings.heatmap_sample, seed=settings.seed)
    P.plot_similarity_heatmap(unit[query_rows][heat], q_labels[heat], class_names, plot_dir / "heatmap.png",
                              f"{tag}: cosine similarity, sorted by class")
    made["heatmap"] = "heatmap.png"
    P.plot_pca_variance(diagnostics["unit"]["pca_explained_variance_ratio"], plot_dir / "pca_variance.png",
                        f"{tag}: PCA explained variance (unit vectors)")
    made["pca_variance"] = "pca_variance.png"
    P.plot_norm_histogram(np.linalg.norm(raw[gallery_rows], axis=1), plot_dir / "norms.png",
                          f"{tag}: norms of raw pooled features")
    made["norms"] = "norms.png"
    P.plot_k_occurrence(results["unit/cosine"].k_occurrence, plot_dir / "k_occurrence.png",
                        f"{tag}: k-occurrence (k={settings.k}), cosine")
    made["k_occurrence"] = "k_occurrence.png"

    grids = []
    if settings.grid_queries > 0:
        rng = np.random.default_rng(settings.seed)
        # One query per class first, so the grid shows the variety of the dataset.
        by_class = {}
        for i in rng.permutation(len(query_rows)):
            by_class.setdefault(q_labels[i], i)
        chosen = list(by_class.values())[: settings.grid_queries]
        wanted = {items["id"].iat[query_rows[i]] for i in chosen}
        for variant in GRID_VARIANTS:
            for n in results[variant].neighbours[chosen].reshape(-1):
                if n >= 0:
                    wanted.add(items["id"].iat[gallery_rows[n]])
        splits = sorted(set([settings.query_split, *settings.gallery_splits]))
        shards = [s for split in splits for s in list_shards(run_dir.dataset_dir, split)]
        images = load_images(shards, wanted)
        ids = items["id"].to_numpy()
        names = items["label_name"].to_numpy()
        for variant, title in GRID_VARIANTS.items():
            result = results[variant]
            q_images, q_names, n_images, n_names, n_scores, correct = [], [], [], [], [], []
            for i in chosen:
                q = query_rows[i]
                q_images.append(images.get(ids[q]))
                q_names.append(names[q])
                row_images, row_names, row_scores, row_ok = [], [], [], []
                for n, score in zip(result.neighbours[i], result.neighbour_scores[i]):
                    if n < 0:
                        row_images.append(None), row_names.append(None), row_scores.append(None), row_ok.append(None)
                        continue
                    g = gallery_rows[n]
                    row_images.append(images.get(ids[g]))
                    row_names.append(names[g])
                    row_scores.append(float(score))
                    row_ok.append(bool(labels[g] == labels[q]))
                n_images.append(row_images), n_names.append(row_names)
                n_scores.append(row_scores), correct.append(row_ok)
            file = f"grid_{variant.replace('/', '_')}.png"
            P.plot_neighbour_grid(q_images, q_names, n_images, n_names, n_scores, correct, plot_dir / file,
                                  f"{tag}: top-{settings.k} neighbours, {title}",
                                  "cosine" if variant.endswith("cosine") else "distance")
            grids.append({"title": title, "file": file})
    return made, grids
