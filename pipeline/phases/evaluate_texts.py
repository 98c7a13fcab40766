"""Phase 2's text side, for embeddings with one (phase 1 of a CLIP backbone): zero-shot classification, text ->
image and image -> text retrieval with item and class relevance (pipeline/vectors/crossmodal.py), written into
metrics.json's "text" by evaluate.py, with text_neighbours.csv and plots/grid_text_to_image.png.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.config import EvaluateConfig
from pipeline.core import atomic

log = logging.getLogger("embedlab.evaluate")


def evaluate_texts(out: Path, dataset_dir: Path, items, unit: np.ndarray, texts: dict, query_rows: np.ndarray,
                   gallery_rows: np.ndarray, settings: EvaluateConfig, tag: str) -> dict:
    """metrics.json's "text": zero-shot accuracy of the query images, text → image (texts of the query split
    against the image gallery) and image → text (query images against the gallery's texts), each with "item"
    relevance (the own image / own text) and "class" relevance; example text queries drawn as a grid."""
    from pipeline.reporting.figures import draw_text_query_grid, grid_queries
    from pipeline.vectors.crossmodal import crossmodal_retrieval, zero_shot

    labels = items["label"].to_numpy()
    keys = {"item": np.arange(len(items)), "class": labels}
    class_names = dict(zip(items["label"], items["label_name"]))
    info = texts["meta"]
    result: dict = {"zero_shot_prompt": info.get("zero_shot_prompt"), "class_prompts": texts["prompts"],
                    "n_items_with_text": int(texts["has_text"].sum()), "n_truncated": info.get("n_truncated", 0)}
    if len(texts["class_prompts"]):
        shot = zero_shot(unit[query_rows], labels[query_rows], texts["class_prompts"],
                         chunk_size=settings.chunk_size)
        shot.pop("predicted")
        for entry in shot["per_class"]:
            entry["class"] = class_names.get(entry["label"], str(entry["label"]))
        result["zero_shot"] = shot
        log.info("phase 2: %s zero-shot top-1 %.3f  top-5 %.3f (%d queries, %d classes)", tag, shot["top-1"],
                 shot["top-5"], shot["n_queries"], shot["n_classes"])
    if texts["text"] is None:
        return result

    has_text = texts["has_text"]
    text_queries, text_gallery = query_rows[has_text[query_rows]], gallery_rows[has_text[gallery_rows]]
    result["n_text_queries"], result["n_gallery_texts"] = int(len(text_queries)), int(len(text_gallery))
    directions = {"text_to_image": (texts["text"], text_queries, unit, gallery_rows),
                  "image_to_text": (unit, query_rows, texts["text"], text_gallery)}
    ranked = {}
    for direction, (q_space, q_rows, g_space, g_rows) in directions.items():
        if len(q_rows) == 0 or len(g_rows) == 0:
            continue
        result[direction] = {}
        for relevance, key in keys.items():
            found = crossmodal_retrieval(q_space[q_rows], key[q_rows], g_space[g_rows], key[g_rows],
                                         chunk_size=settings.chunk_size)
            result[direction][relevance] = found.metrics
            ranked[direction] = found          # the ranking is the same for both relevances
        row = result[direction]["item"]
        log.info("phase 2: %s %s (item) R@1 %.3f  R@10 %.3f  mAP %.3f (%d queries)", tag, direction, row["R@1"],
                 row["R@10"], row["mAP"], row["n_queries"])
    if "text_to_image" in ranked:
        found = ranked["text_to_image"]
        _write_text_neighbours(out, items, text_queries, gallery_rows, found.neighbours, found.neighbour_scores)
        if settings.grid_queries > 0:
            chosen = grid_queries(labels[text_queries], settings.grid_queries, settings.seed)
            splits = sorted({settings.query_split, *settings.gallery_splits})
            result["grid"] = draw_text_query_grid(out / "plots", dataset_dir, items, text_queries[chosen],
                                                  gallery_rows, found.neighbours[chosen],
                                                  found.neighbour_scores[chosen], splits, tag, settings.k)
            result["examples"] = [_example(items, q, gallery_rows, found.neighbours[i])
                                  for q, i in zip(text_queries[chosen], chosen)]
    return result


def _example(items, row: int, gallery_rows: np.ndarray, neighbours: np.ndarray) -> dict:
    """One example text query: its text and class, and the rank of its own image among the first results."""
    found = [rank for rank, n in enumerate(neighbours, start=1) if n >= 0 and gallery_rows[n] == row]
    return {"id": items["id"].iat[row], "text": items["text"].iat[row], "class": items["label_name"].iat[row],
            "own_image_rank": found[0] if found else None, "ranks_shown": int((neighbours >= 0).sum())}


def _write_text_neighbours(out: Path, items, text_rows, gallery_rows, neighbours, scores) -> None:
    import pandas as pd

    ids, names, texts = items["id"].to_numpy(), items["label_name"].to_numpy(), items["text"].to_numpy()
    valid = neighbours >= 0
    query = np.repeat(text_rows, neighbours.shape[1])[valid.reshape(-1)]
    found = gallery_rows[neighbours[valid]]
    table = pd.DataFrame({
        "query_id": ids[query], "query_text": texts[query], "query_label": names[query],
        "rank": np.tile(np.arange(1, neighbours.shape[1] + 1), len(text_rows))[valid.reshape(-1)],
        "image_id": ids[found], "image_label": names[found], "score": scores[valid],
        "own_image": found == query, "same_class": names[found] == names[query],
    })
    out.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_open(out / "text_neighbours.csv", "w", encoding="utf-8", newline="") as f:
        table.to_csv(f, index=False, float_format="%.6f")
