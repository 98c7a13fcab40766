"""pipeline.vectors.projections: the sample query rows are drawn on, and how the projection process shares the
cores with its caller."""
from __future__ import annotations

from concurrent.futures import Future

import numpy as np
from threadpoolctl import threadpool_info

from pipeline.vectors.projections import BackgroundProjections, sample_rows


def test_sample_rows_is_stratified_seeded_and_described():
    labels = np.repeat([0, 1, 2], [60, 30, 10])
    rows = np.arange(100, 200)
    all_of_them, none = sample_rows(rows, np.concatenate([np.zeros(100, int), labels]), 0, seed=3)
    assert none is None and all_of_them is rows
    full = np.concatenate([np.zeros(100, int), labels])
    chosen, drawn = sample_rows(rows, full, 20, seed=3)
    assert drawn == {"max_queries": 20, "n_available": 100, "n_sampled": 20, "method": "stratified by class",
                     "seed": 3, "n_classes": 3}
    assert np.all(np.isin(chosen, rows)) and len(np.unique(chosen)) == 20
    assert np.bincount(full[chosen]).tolist() == [12, 6, 2]           # proportional to 60/30/10
    again, _ = sample_rows(rows, full, 20, seed=3)
    other, _ = sample_rows(rows, full, 20, seed=4)
    np.testing.assert_array_equal(chosen, again)
    assert not np.array_equal(chosen, other)
    same, _ = sample_rows(rows, full, 100, seed=3)
    assert same is rows


def blas_threads() -> int:
    return max(info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas")


def test_callers_pools_leave_the_running_worker_its_cores():
    projections = BackgroundProjections(np.eye(6, dtype=np.float32), ["pca"])   # PCA: in-line, no process
    before = blas_threads()
    with projections.sharing_cores():
        assert blas_threads() == before                                   # nothing runs beside: no limit
    running, finished = Future(), Future()                                # one worker still at work, one done
    finished.set_result({})
    projections._futures = {"tsne": finished, "umap": running}
    import os

    with projections.sharing_cores():
        assert blas_threads() == max(1, len(os.sched_getaffinity(0)) - 1)
    assert blas_threads() == before
    running.set_result({})
    with projections.sharing_cores():
        assert blas_threads() == before                                   # finished: no limit
