"""The "Text ↔ image" section of a backbone in the phase-2 report (backbones with a text tower, e.g. CLIP):
the cross-modal retrieval table, zero-shot accuracy (overall and per class), example text queries, and the
readings that follow from those numbers. Built from metrics.json's "text" (pipeline/phases/evaluate.py)."""
from __future__ import annotations

from collections.abc import Mapping

from pipeline.reporting.formatting import DASH, fmt, fmt_count, get, to_float
from pipeline.reporting.readings import versus_chance

RETRIEVAL_COLUMNS = ("R@1", "R@5", "R@10", "MAP@R", "mAP")
# (direction, relevance) -> how the table names the row.
RETRIEVAL_ROWS = {
    ("text_to_image", "item"): "text → image, its own image",
    ("text_to_image", "class"): "text → image, any image of its class",
    ("image_to_text", "item"): "image → text, its own text",
    ("image_to_text", "class"): "image → text, any text of its class",
}
# Per-class tables longer than this show the worst and the best classes only.
MAX_CLASS_ROWS = 20


def _retrieval_rows(text: Mapping) -> list[dict]:
    rows = []
    for (direction, relevance), name in RETRIEVAL_ROWS.items():
        row = get(text, direction, relevance)
        if not isinstance(row, Mapping):
            continue
        evaluated = to_float(row.get("n_queries_evaluated"))
        rows.append({"name": name, "cells": [fmt(to_float(row.get(c))) if evaluated else DASH
                                             for c in RETRIEVAL_COLUMNS],
                     "queries": fmt_count(evaluated), "gallery": fmt_count(row.get("gallery_size")),
                     "without_positive": fmt_count(row.get("n_queries_without_positive"))})
    return rows


def _per_class(shot: Mapping) -> list[dict]:
    entries = [e for e in shot.get("per_class") or [] if isinstance(e, Mapping)]
    ordered = sorted(entries, key=lambda e: (to_float(e.get("top-1")) or 0.0, str(e.get("class"))))
    if len(ordered) > MAX_CLASS_ROWS:
        half = MAX_CLASS_ROWS // 2
        tables = [("Worst classes by zero-shot top-1", ordered[:half]),
                  ("Best classes by zero-shot top-1", list(reversed(ordered))[:half])]
    else:
        tables = [(f"All {len(ordered)} classes, worst top-1 first", ordered)]
    return [{"title": title, "rows": [{"name": fmt(e.get("class")), "n": fmt_count(e.get("n")),
                                       "top1": fmt(to_float(e.get("top-1"))), "top5": fmt(to_float(e.get("top-5")))}
                                      for e in rows]} for title, rows in tables if rows]


def _examples(text: Mapping) -> list[dict]:
    out = []
    for e in text.get("examples") or []:
        if not isinstance(e, Mapping):
            continue
        rank = e.get("own_image_rank")
        shown = e.get("ranks_shown")
        out.append({"text": str(e.get("text") or ""), "class": fmt(e.get("class")),
                    "rank": f"#{rank}" if rank else f"not in the first {fmt_count(shown)}"})
    return out


def _readings(text: Mapping) -> list[str]:
    sentences = []
    shot = text.get("zero_shot") if isinstance(text.get("zero_shot"), Mapping) else {}
    n_classes = to_float(shot.get("n_classes"))
    if n_classes:
        sentences.append(versus_chance("Zero-shot top-1 accuracy", shot.get("top-1"), 1 / n_classes,
                                       shot.get("n_queries"), f"{int(n_classes)} classes"))
    own = get(text, "text_to_image", "item")
    if isinstance(own, Mapping) and to_float(own.get("gallery_size")):
        gallery = int(to_float(own["gallery_size"]))
        sentences.append(versus_chance("Text → image R@1 (the text's own image first)", own.get("R@1"),
                                       1 / gallery, own.get("n_queries_evaluated"), f"one image of {gallery:,}"))
    return [s for s in sentences if s]


def _notes(text: Mapping) -> list[str]:
    notes = []
    n_text = to_float(text.get("n_items_with_text"))
    if not n_text:
        notes.append("No item has a text (a manifest's `text` column, or `data.text_prompt`): only zero-shot "
                     "classification is measured.")
    else:
        if "text_to_image" not in text:
            notes.append("No text in the query split: text → image is not measured.")
        if "image_to_text" not in text:
            notes.append("No text in the gallery: image → text is not measured.")
        if get(text, "text_to_image", "item", "n_queries_evaluated") == 0:
            notes.append("The texts' own images are not in the gallery, so text → image with its own image as "
                         "the answer scores nothing; add the query split to evaluate.gallery_splits.")
    cut = to_float(text.get("n_truncated"))
    if cut:
        notes.append(f"{int(cut):,} text{'s' if cut != 1 else ''} longer than CLIP's 77 tokens "
                     f"{'were' if cut != 1 else 'was'} cut to {'their' if cut != 1 else 'its'} first 75 tokens.")
    return notes


def text_view(metrics: Mapping, grid: dict | None) -> dict | None:
    """The section's view, or None for a backbone without text results (the section is then absent)."""
    text = metrics.get("text") if isinstance(metrics, Mapping) else None
    if not isinstance(text, Mapping):
        return None
    shot = text.get("zero_shot") if isinstance(text.get("zero_shot"), Mapping) else {}
    top_k = get(shot, "k", "top-5")
    if grid:
        grid["title"] = ("Example text queries and their first images: green frame = the text's class, "
                         "red dashed = another class; ★ marks the text's own image")
    return {
        "columns": list(RETRIEVAL_COLUMNS),
        "rows": _retrieval_rows(text),
        "zero_shot": {"top1": fmt(to_float(shot.get("top-1"))), "top5": fmt(to_float(shot.get("top-5"))),
                      "top5_label": f"top-{top_k}" if top_k else "top-5",
                      "n": fmt_count(shot.get("n_queries")), "classes": fmt_count(shot.get("n_classes")),
                      "prompt": str(text.get("zero_shot_prompt") or "")} if shot else None,
        "per_class": _per_class(shot) if shot else [],
        "prompts": [str(p) for p in (text.get("class_prompts") or [])[:MAX_CLASS_ROWS]],
        "n_prompts": len(text.get("class_prompts") or []),
        "examples": _examples(text),
        "grid": grid,
        "readings": _readings(text),
        "notes": _notes(text),
        "facts": [("items with text", fmt_count(text.get("n_items_with_text"))),
                  ("text queries", fmt_count(text.get("n_text_queries"))),
                  ("texts in the gallery", fmt_count(text.get("n_gallery_texts")))],
    }
