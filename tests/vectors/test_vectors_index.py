import numpy as np
import pytest

from pipeline.vectors.index import build_index, load_index, save_index, search
from pipeline.vectors.normalize import l2_normalize


def test_l2_normalize_handles_tiny_and_zero_rows():
    x = np.array([[3e-17, 4e-17], [0.0, 0.0], [3.0, 4.0]], dtype=np.float32)
    y = l2_normalize(x)
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0], [0.6, 0.8]], atol=1e-6)
    assert np.isfinite(y).all()


def test_flat_index_matches_brute_force_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    gallery = l2_normalize(rng.standard_normal((300, 16)))
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    index = build_index(gallery, "flat")
    save_index(index, tmp_path / "index.faiss")
    loaded = load_index(tmp_path / "index.faiss")
    scores, rows = search(loaded, queries, k=5)
    brute = l2_normalize(queries) @ gallery.T
    expected = np.argsort(-brute, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(brute, expected, axis=1), atol=1e-5)
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file may be left behind"


def test_hnsw_index_recall_on_clustered_data():
    rng = np.random.default_rng(1)
    centres = l2_normalize(rng.standard_normal((20, 32)))
    gallery = l2_normalize(np.repeat(centres, 100, axis=0) + 0.3 * rng.standard_normal((2000, 32)))
    queries = gallery[:200] + 0.01 * rng.standard_normal((200, 32)).astype(np.float32)
    _, exact = search(build_index(gallery, "flat"), queries, k=10)
    _, approx = search(build_index(gallery, "hnsw"), queries, k=10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall > 0.9


def test_bad_inputs():
    with pytest.raises(ValueError):
        build_index(np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="unknown index kind"):
        build_index(np.ones((2, 4), np.float32), "ivf9")
    with pytest.raises(FileNotFoundError):
        load_index("/nonexistent/index.faiss")
