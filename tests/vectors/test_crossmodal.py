"""Text ↔ image retrieval and zero-shot accuracy against brute force: every score of every pair, full
argsort (stable, so ties go to the lower gallery index), metrics from their definitions."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.vectors.crossmodal import crossmodal_retrieval, zero_shot


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(query, query_keys, gallery, gallery_keys, ks=(1, 5, 10)):
    scores = _unit(query).astype(np.float32) @ _unit(gallery).astype(np.float32).T
    out = {f"R@{k}": [] for k in ks} | {"MAP@R": [], "mAP": []}
    for q in range(len(query)):
        relevant = gallery_keys == query_keys[q]
        r = int(relevant.sum())
        if r == 0:
            continue
        order = np.argsort(-scores[q], kind="stable")
        rel_ranked = relevant[order]
        for k in ks:
            out[f"R@{k}"].append(float(rel_ranked[:min(k, len(gallery))].any()))
        precision = np.cumsum(rel_ranked) / np.arange(1, len(gallery) + 1)
        out["MAP@R"].append(float((precision[:r] * rel_ranked[:r]).sum() / r))
        # AP with tied scores entering together (sklearn's rule).
        ap = 0.0
        for j in np.flatnonzero(relevant):
            at_least = scores[q] >= scores[q, j]
            ap += (relevant & at_least).sum() / at_least.sum()
        out["mAP"].append(ap / r)
    return {name: float(np.mean(values)) for name, values in out.items()}, len(out["mAP"])


@pytest.mark.parametrize("relevance", ["item", "class"])
def test_text_to_image_matches_brute_force(relevance):
    rng = np.random.default_rng(1)
    n_items, dim = 40, 8
    labels = rng.integers(0, 4, n_items)
    images = rng.normal(size=(n_items, dim)) + 2.0 * np.eye(4, dim)[labels]
    # Each text near its own image, some far from it; texts for every other item only.
    texts = images + rng.normal(scale=rng.choice([0.3, 3.0], n_items)[:, None], size=(n_items, dim))
    text_rows = np.arange(0, n_items, 2)
    keys = np.arange(n_items) if relevance == "item" else labels
    got = crossmodal_retrieval(texts[text_rows], keys[text_rows], images, keys, chunk_size=7)
    expected, n = _brute(texts[text_rows], keys[text_rows], images, keys)
    assert got.metrics["n_queries_evaluated"] == n == len(text_rows) and got.metrics["gallery_size"] == n_items
    for name, value in expected.items():
        assert got.metrics[name] == pytest.approx(value, abs=1e-6), name
    if relevance == "item":
        assert got.metrics["MAP@R"] == pytest.approx(got.metrics["R@1"])   # R = 1: MAP@R is P@1
        assert np.all(got.n_relevant == 1)


def test_image_to_text_counts_queries_without_their_text_apart():
    rng = np.random.default_rng(2)
    images, texts = rng.normal(size=(12, 6)), rng.normal(size=(12, 6))
    has_text = np.arange(12) % 3 != 0
    keys = np.arange(12)
    got = crossmodal_retrieval(images, keys, texts[has_text], keys[has_text])
    expected, n = _brute(images, keys, texts[has_text], keys[has_text])
    assert got.metrics["n_queries_without_positive"] == 4 and got.metrics["n_queries_evaluated"] == n == 8
    for name, value in expected.items():
        assert got.metrics[name] == pytest.approx(value, abs=1e-6), name


def test_ties_go_to_the_lower_gallery_index():
    gallery = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    query = np.array([[1.0, 0.0], [1.0, 0.0]])
    got = crossmodal_retrieval(query, np.array([1, 0]), gallery, np.arange(3), ks=(1, 2))
    # Items 0 and 1 tie and item 0 ranks first: query 0 (own item 1) misses at 1, query 1 (own item 0) hits.
    assert got.neighbours[:, :2].tolist() == [[0, 1], [0, 1]]
    assert got.metrics["R@1"] == pytest.approx(0.5) and got.metrics["R@2"] == 1.0
    # AP lets the tied pair enter together (1 relevant of 2 items), whatever their order: 1/2 for both.
    assert got.metrics["mAP"] == pytest.approx(0.5)


def test_zero_shot_accuracy_matches_brute_force():
    rng = np.random.default_rng(3)
    n_classes, dim = 7, 10
    prompts = _unit(rng.normal(size=(n_classes, dim)))
    labels = rng.integers(0, n_classes, 90)
    images = prompts[labels] + rng.normal(scale=0.9, size=(90, dim))
    got = zero_shot(images, labels, prompts, chunk_size=16)
    scores = _unit(images) @ prompts.T
    order = np.argsort(-scores, axis=1, kind="stable")
    top1 = order[:, 0] == labels
    top5 = (order[:, :5] == labels[:, None]).any(axis=1)
    assert got["top-1"] == pytest.approx(top1.mean()) and got["top-5"] == pytest.approx(top5.mean())
    assert 0 < got["top-1"] < got["top-5"] < 1
    np.testing.assert_array_equal(got["predicted"], order[:, 0])
    assert got["k"] == {"top-1": 1, "top-5": 5} and got["n_classes"] == n_classes and got["n_queries"] == 90
    for entry in got["per_class"]:
        mask = labels == entry["label"]
        assert entry["n"] == mask.sum() and entry["top-1"] == pytest.approx(top1[mask].mean())
        assert entry["top-5"] == pytest.approx(top5[mask].mean())
    # Fewer classes than 5: top-5 is capped at the number of classes, so every image is right.
    few = zero_shot(images[labels < 3], labels[labels < 3], prompts[:3])
    assert few["k"]["top-5"] == 3 and few["top-5"] == 1.0
