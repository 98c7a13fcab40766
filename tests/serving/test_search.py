"""Searcher: ranked hits checked against brute-force numpy, filters, per-item image errors."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.serving.bundle import open_bundle


@pytest.fixture(scope="module")
def searcher(exported):
    from pipeline.serving.search import Searcher

    return Searcher(open_bundle(exported))


def test_search_ranks_like_brute_force_numpy(searcher):
    embeddings = searcher.bundle.embeddings
    queries = embeddings[[0, 5, 11]] + 0.05 * np.random.default_rng(0).standard_normal((3, embeddings.shape[1]))
    unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    for query, hits in zip(unit, searcher.search(queries, k=7)):
        scores = embeddings @ query
        order = np.argsort(-scores, kind="stable")[:7]
        assert [h.id for h in hits] == searcher.bundle.items["id"].to_numpy()[order].tolist()
        np.testing.assert_allclose([h.score for h in hits], scores[order], atol=1e-5)
        assert [h.rank for h in hits] == list(range(1, 8))


def test_filters_keep_matching_items_and_unknown_columns_are_one_line(searcher):
    items = searcher.bundle.items
    query = searcher.bundle.embeddings[0]
    hits = searcher.search(query, k=50, filters={"label_name": "class_2"})[0]
    assert len(hits) == int((items["label_name"] == "class_2").sum())
    assert {h.label_name for h in hits} == {"class_2"}
    wanted = items.loc[items["label_name"] == "class_2"]
    scores = searcher.bundle.embeddings[wanted.index.to_numpy()] @ query
    assert [h.id for h in hits] == wanted["id"].to_numpy()[np.argsort(-scores, kind="stable")].tolist()
    both = searcher.search(query, k=50, filters={"label": ["1", 3], "split": "test"})[0]
    assert {(h.label, h.split) for h in both} <= {(1, "test"), (3, "test")} and both
    assert searcher.search(query, k=5, filters={"group": "no such group"}) == [[]]
    with pytest.raises(ValueError, match="unknown filter column 'colour'; item columns: id, label"):
        searcher.search(query, filters={"colour": "red"})


def test_bad_images_are_reported_per_item(searcher):
    own = searcher.bundle.thumbnail(searcher.bundle.items["id"].iat[4])
    vectors, errors = searcher.embed_images([b"", own, b"GIF89a-truncated", own[: len(own) // 3]])
    assert set(errors) == {0, 2, 3} and errors[0] == "empty file"
    assert vectors.shape == (1, searcher.dim)
    assert searcher.search(vectors, k=1)[0][0].id == searcher.bundle.items["id"].iat[4]
    with pytest.raises(ValueError, match="no text model"):
        searcher.embed_texts(["red dress"])


def test_category_rerank_puts_the_voted_category_first(searcher):
    items = searcher.bundle.items
    labels = items["label"].to_numpy()
    rng = np.random.default_rng(3)
    queries = rng.standard_normal((4, searcher.dim)).astype(np.float32)   # anywhere: mixed neighbourhoods
    plain = searcher.search(queries, k=len(items))
    ranked = searcher.search(queries, k=6, rerank="category")
    for before, after in zip(plain, ranked):
        votes = [h.label for h in before[:10]]
        counts = {label: votes.count(label) for label in votes}
        best = max(counts.values())
        voted = next(label for label in votes if counts[label] == best)      # ties: the nearest one
        expected = ([h for h in before if h.label == voted] + [h for h in before if h.label != voted])[:6]
        assert [h.id for h in after] == [h.id for h in expected]
        assert [h.rank for h in after] == list(range(1, 7))
    assert labels.size and searcher.search(queries[:1], k=3, rerank="boost")[0][0].score >= plain[0][0].score
    with pytest.raises(ValueError, match="unknown re-ranking 'magic'"):
        searcher.search(queries, rerank="magic")
