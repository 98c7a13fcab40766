"""The report's "Text ↔ image" section: present only with text results, its readings follow from the numbers,
and text queries draw as text in the neighbour grid."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.reporting.readings import versus_chance
from pipeline.reporting.report import build_view, render_report
from pipeline.reporting.text_view import text_view


def _row(r1, n=100, gallery=200):
    return {"R@1": r1, "R@5": min(1.0, r1 * 2), "R@10": min(1.0, r1 * 3), "MAP@R": r1, "mAP": r1 + 0.01,
            "n_queries": n, "n_queries_evaluated": n, "n_queries_without_positive": 0, "gallery_size": gallery}


TEXT = {
    "zero_shot_prompt": "a photo of a {label}", "class_prompts": ["a photo of a cat", "a photo of a dog"],
    "n_items_with_text": 400, "n_truncated": 3, "n_text_queries": 100, "n_gallery_texts": 200,
    "zero_shot": {"top-1": 0.81, "top-5": 1.0, "k": {"top-1": 1, "top-5": 2}, "n_queries": 100, "n_classes": 2,
                  "per_class": [{"label": 0, "class": "cat", "n": 50, "top-1": 0.7, "top-5": 1.0},
                                {"label": 1, "class": "dog", "n": 50, "top-1": 0.92, "top-5": 1.0}]},
    "text_to_image": {"item": _row(0.2), "class": _row(0.9)},
    "image_to_text": {"item": _row(0.1), "class": _row(0.85)},
    "examples": [{"id": "a", "text": "a <b>cat</b> on a sofa", "class": "cat", "own_image_rank": 2, "ranks_shown": 10},
                 {"id": "b", "text": "a dog", "class": "dog", "own_image_rank": None, "ranks_shown": 10}],
}


def test_no_text_results_no_section(tmp_path):
    assert text_view({"retrieval": {}}, None) is None
    html = render_report(tmp_path, {"backbones": [{"tag": "mobilenet", "metrics": {"retrieval": {}}}]}).read_text()
    assert "Text ↔ image" not in html


def test_section_shows_the_numbers_and_escapes_texts(tmp_path):
    view = build_view(tmp_path, {"backbones": [{"tag": "clip", "metrics": {"text": TEXT}}]})
    text = view["backbones"][0]["text"]
    assert [r["name"] for r in text["rows"]] == ["text → image, its own image", "text → image, any image of its class",
                                                 "image → text, its own text", "image → text, any text of its class"]
    assert text["rows"][0]["cells"] == ["0.200", "0.400", "0.600", "0.200", "0.210"]
    assert text["zero_shot"]["top1"] == "0.810" and text["zero_shot"]["top5_label"] == "top-2"
    assert [e["rank"] for e in text["examples"]] == ["#2", "not in the first 10"]
    assert text["per_class"][0]["rows"][0]["name"] == "cat", "worst class first"
    assert any("3 texts longer than CLIP's 77 tokens" in n for n in text["notes"])
    html = render_report(tmp_path, {"backbones": [{"tag": "clip", "metrics": {"text": TEXT}}]}).read_text()
    assert "Text ↔ image" in html and "a &lt;b&gt;cat&lt;/b&gt; on a sofa" in html and "<b>cat</b>" not in html
    # Readings follow from the numbers shown: 0.81 vs 0.5 by chance on 100 queries is above chance.
    assert any("Zero-shot top-1 accuracy is 0.810 on 100 queries" in r and "above chance" in r
               for r in text["readings"])


def test_only_zero_shot_without_item_texts(tmp_path):
    only = {k: v for k, v in TEXT.items() if k not in ("text_to_image", "image_to_text", "examples")}
    text = text_view({"text": {**only, "n_items_with_text": 0, "n_truncated": 0}}, None)
    assert text["rows"] == [] and text["zero_shot"]["n"] == "100"
    assert any("No item has a text" in n for n in text["notes"])


@pytest.mark.parametrize("value, n, verdict", [
    (0.5, 400, "above chance"), (0.1, 400, "not distinguishable"), (0.02, 400, "below chance"),
    (0.9, 10, "too few queries"),
])
def test_versus_chance_follows_a_binomial_at_the_chance_rate(value, n, verdict):
    sentence = versus_chance("top-1", value, 0.1, n, "10 classes")
    assert verdict in sentence
    if n >= 30:
        two_se = 2 * np.sqrt(0.1 * 0.9 / n)
        assert f"{two_se:.3f}" in sentence


def test_text_queries_are_drawn_as_text(tmp_path):
    from pipeline.reporting.neighbour_grid import plot_neighbour_grid

    image = np.full((8, 8, 3), 200, np.uint8)
    path = plot_neighbour_grid([None, None], ["cat", "dog"], [[image, image], [image]], [["★ cat", "dog"], ["dog"]],
                               [[0.3, 0.2], [0.1]], [[True, False], [True]], tmp_path / "g.png", "text → image",
                               "cosine", query_texts=["a long caption " * 10, "a dog"])
    assert path.is_file() and path.stat().st_size > 1000
