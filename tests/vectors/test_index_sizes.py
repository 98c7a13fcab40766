import numpy as np
import pytest

from pipeline.vectors.index import (
    LARGE_KIND,
    build_index,
    choose_kind,
    exact_kth_scores,
    index_kind,
    ivfpq_layout,
    load_index,
    measure_recall,
    save_index,
    search,
    set_search_params,
)
from pipeline.vectors.normalize import l2_normalize


def clustered(n: int, dim: int, n_centres: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.standard_normal((n_centres, dim)))
    return l2_normalize(centres[rng.integers(0, n_centres, n)] + 0.15 * rng.standard_normal((n, dim)))


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """FAISS's OpenMP threads busy-wait; on shared, oversubscribed cores one thread is many times faster."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module")
def gallery() -> np.ndarray:
    return clustered(3000, 32, 30)


@pytest.fixture(scope="module")
def trained_ivfpq(gallery):
    return build_index(gallery, "ivfpq")


def copy_of(index):
    import faiss

    return faiss.clone_index(index)


def brute_force_recall(index, x: np.ndarray, rows: np.ndarray, k: int) -> float:
    """|index top-k & exact top-k| / k from a full score matrix (continuous data: no ties)."""
    scores = x[rows] @ x.T
    exact = np.argsort(-scores, axis=1)[:, :k]
    _, found = index.search(x[rows], k)
    return float(np.mean([len(set(f) & set(e)) / k for f, e in zip(found, exact)]))


def test_flat_recall_is_one(gallery):
    assert measure_recall(build_index(gallery, "flat"), gallery, k=10, sample=500) == 1.0


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_recall_is_high_and_matches_brute_force(gallery, trained_ivfpq, kind):
    index = build_index(gallery, kind) if kind == "hnsw" else copy_of(trained_ivfpq)
    value = measure_recall(index, gallery, k=10, sample=400, seed=3)
    assert 0.9 <= value <= 1.0
    # A deliberately weak setting: recall drops, and equals the brute-force count on the same sample.
    set_search_params(index, **({"ef_search": 10} if kind == "hnsw" else {"nprobe": 1, "refine_factor": 1}))
    weak = measure_recall(index, gallery, k=10, sample=400, seed=3)
    rows = np.sort(np.random.default_rng(3).choice(len(gallery), size=400, replace=False))
    assert weak == pytest.approx(brute_force_recall(index, gallery, rows, 10), abs=1e-9)
    assert weak < value


def test_exact_kth_scores_cross_blocks():
    rng = np.random.default_rng(0)
    x = l2_normalize(rng.standard_normal((40_000, 8)))  # more rows than one exact-search block
    q = l2_normalize(rng.standard_normal((30, 8)))
    expected = np.sort(q @ x.T, axis=1)[:, -7]
    np.testing.assert_allclose(exact_kth_scores(q, x, 7), expected, atol=1e-6)


def test_auto_crosses_the_threshold(gallery):
    assert choose_kind(3000, exact_limit=3000) == "flat"
    assert index_kind(build_index(gallery, "auto", exact_limit=3000)) == "flat"
    assert index_kind(build_index(gallery[:500], "auto", exact_limit=499)) == LARGE_KIND
    assert choose_kind(200_000) == "flat" and choose_kind(200_001) == LARGE_KIND


def test_ivfpq_layout():
    assert ivfpq_layout(1_000_000, 512) == {"nlist": 2048, "m": 64, "nbits": 8, "nprobe": 16}
    assert ivfpq_layout(100_000, 512) == {"nlist": 1024, "m": 64, "nbits": 8, "nprobe": 16}
    assert ivfpq_layout(20_000_000, 512)["nprobe"] == 16384 // 128
    small = ivfpq_layout(3000, 30)  # 30 = 2 x 3 x 5: largest divisor <= 30 // 8 is 3
    assert small["m"] == 3 and small["nbits"] == 6 and small["nlist"] == 64 and small["nprobe"] == 16
    with pytest.raises(ValueError):
        ivfpq_layout(0, 8)


def test_ivfpq_settings_survive_save_and_load(gallery, trained_ivfpq, tmp_path):
    index = copy_of(trained_ivfpq)
    set_search_params(index, nprobe=4, refine_factor=3)
    assert index_kind(index) == "ivfpq"
    save_index(index, tmp_path / "ivfpq.faiss")
    loaded = load_index(tmp_path / "ivfpq.faiss")
    assert index_kind(loaded) == "ivfpq"
    import faiss

    refine = faiss.downcast_index(loaded)
    assert faiss.downcast_index(refine.base_index).nprobe == 4 and refine.k_factor == 3
    np.testing.assert_array_equal(search(loaded, gallery[:20], 10)[1], search(index, gallery[:20], 10)[1])


def test_bad_arguments(gallery):
    flat = build_index(gallery[:100], "flat")
    with pytest.raises(ValueError, match="ef_search does not apply to a flat index"):
        set_search_params(flat, ef_search=16)
    with pytest.raises(ValueError, match="holds 100 vectors"):
        measure_recall(flat, gallery)
    with pytest.raises(ValueError, match="unknown index kind"):
        build_index(gallery, "lsh")


def test_padding_slots_score_minus_infinity(gallery, trained_ivfpq):
    index = copy_of(trained_ivfpq)
    set_search_params(index, nprobe=1, refine_factor=1)
    scores, rows = search(index, gallery[:5], 1000)  # one inverted list holds fewer than 1000 items
    assert (rows < 0).any()
    assert np.all(np.isneginf(scores[rows < 0])) and np.all(np.isfinite(scores[rows >= 0]))


def test_build_arguments_reach_the_index(gallery):
    import faiss

    built = build_index(gallery[:1000], "ivfpq", nprobe=4, refine_factor=3)  # owns what downcast_index views
    ivfpq = faiss.downcast_index(built)
    assert faiss.downcast_index(ivfpq.base_index).nprobe == 4 and ivfpq.k_factor == 3
    built = build_index(gallery[:300], "hnsw", ef_search=20, ef_construction=50)
    hnsw = faiss.downcast_index(built)
    assert hnsw.hnsw.efSearch == 20 and hnsw.hnsw.efConstruction == 50
