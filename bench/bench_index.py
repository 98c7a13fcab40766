"""Benchmark the FAISS index kinds of pipeline.vectors.index: build time, memory, queries/s and recall@10.

    nice -n 19 python bench/bench_index.py [--sizes 100000,1000000] [--real runs/R/embeddings/B/embeddings.npy]

Data: `--centres` cluster centres uniform on the unit sphere in `--dim` dimensions; each item is a centre plus
anisotropic Gaussian noise of total norm about `--spread` (per-axis variance ~ 1/j, j = 1..dim, in a random
rotation: an intrinsic dimension of about 28, the way image embeddings look, rather than isotropic noise, which
is the known worst case of uniform random vectors), then L2-normalised. The queries are 1,000 fresh draws from
the same distribution (not indexed items). `--real` adds a real collection (an embeddings.npy of a run):
its items are the index, 1,000 of them (seeded) the queries.

Per index: build time (s); `measure_recall` at its default search settings (and its time); size (bytes of
`faiss.serialize_index`); RSS growth of this process over the build (psutil, after the data exists);
queries/s with the 1,000 queries in one `search` call (batched) and one query per call (single; 200 queries,
100 for the exact index, 20 of them at 1M); recall@10 = |approx top-10 & exact top-10| / 10, averaged over
the queries, against `IndexFlatIP`. FAISS uses all the cores it is given (OpenMP). Results are printed as
markdown tables.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.vectors.index import (  # noqa: E402
    build_index, choose_kind, ivfpq_layout, measure_recall, set_search_params,
)

K = 10
N_QUERIES = 1000


def make_clustered(n: int, dim: int, n_centres: int, spread: float, seed: int, return_labels: bool = False):
    """n unit vectors around n_centres centres (see the module docstring), built in blocks to bound memory;
    with return_labels, also each vector's centre (its class, for bench/bench_eval_scale.py)."""
    rng = np.random.default_rng(seed)
    structure = np.random.default_rng(12345)  # centres and noise shape shared by gallery and queries
    centres = structure.standard_normal((n_centres, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rotation, _ = np.linalg.qr(structure.standard_normal((dim, dim)))
    axis_scale = 1.0 / np.sqrt(np.arange(1, dim + 1))
    axis_scale *= spread / np.linalg.norm(axis_scale)
    shaped = (axis_scale[:, None] * rotation.T).astype(np.float32)  # noise = z @ shaped
    out = np.empty((n, dim), dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        block = rng.standard_normal((stop - start, dim), dtype=np.float32) @ shaped
        labels[start:stop] = rng.integers(0, n_centres, stop - start)
        block += centres[labels[start:stop]]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:stop] = block
    return (out, labels) if return_labels else out


def rss() -> int:
    return psutil.Process().memory_info().rss


def time_queries(index, queries: np.ndarray, single_queries: int) -> tuple[float, float, np.ndarray]:
    started = time.perf_counter()
    _, rows = index.search(queries, K)
    batched_qps = len(queries) / (time.perf_counter() - started)
    started = time.perf_counter()
    for i in range(single_queries):
        index.search(queries[i:i + 1], K)
    single_qps = single_queries / (time.perf_counter() - started)
    return batched_qps, single_qps, rows


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(e)) / K for f, e in zip(found, exact)]))


def bench_collection(name: str, gallery: np.ndarray, queries: np.ndarray, ef_values, nprobe_values,
                     exact_limit: int, kinds=("hnsw", "ivfpq")) -> list[dict]:
    import faiss

    n = len(gallery)
    rows = []
    single_exact = 20 if n > 300_000 else 100  # flat at 1M: ~0.1 s per query

    def run(label: str, build, settings: list[tuple[str, callable]], single: int):
        gc.collect()
        before = rss()
        started = time.perf_counter()
        index = build()
        build_s = time.perf_counter() - started
        growth = rss() - before
        size = len(faiss.serialize_index(index))
        started = time.perf_counter()
        self_recall = measure_recall(index, gallery, k=K, sample=1000, seed=0)
        measured = (self_recall, time.perf_counter() - started)
        results = []
        for setting, apply in settings:
            apply(index)
            batched, one, found = time_queries(index, queries, single)
            results.append((setting, batched, one, found))
        print(f"  {name} {label}: built in {build_s:.1f} s", flush=True)
        return index, build_s, growth, size, measured, results

    flat, build_s, growth, size, measured, results = run("flat", lambda: build_index(gallery, "flat"),
                                                [("exact", lambda index: None)], single_exact)
    _, batched, one, exact = results[0]
    rows.append(dict(data=name, n=n, index="flat (IndexFlatIP)", setting="exact", build_s=build_s, size=size,
                     rss=growth, batched=batched, single=one, recall=1.0, measured=measured))
    del flat
    for kind, label, key, values in (("hnsw", "HNSW32 (efConstruction 40)", "efSearch", ef_values),
                                     ("ivfpq", "IVF-PQ", "nprobe", nprobe_values)):
        if kind not in kinds:
            continue

        def setter(value, key=key):
            def apply(target):
                set_search_params(target, **{"ef_search" if key == "efSearch" else "nprobe": value})
            return apply

        index, build_s, growth, size, measured, results = run(
            label, lambda kind=kind: build_index(gallery, kind), [(f"{key}={v}", setter(v)) for v in values], 200)
        if kind == "ivfpq":
            layout = ivfpq_layout(n, gallery.shape[1])
            label = f"IVF{layout['nlist']},PQ{layout['m']}x{layout['nbits']} + SQ8 refine x8"
        for setting, batched, one, found in results:
            rows.append(dict(data=name, n=n, index=label, setting=setting, build_s=build_s, size=size, rss=growth,
                             batched=batched, single=one, recall=recall(found, exact), measured=measured))
        del index
    gc.collect()
    rows.append(dict(data=name, n=n, auto=choose_kind(n, exact_limit=exact_limit)))
    return rows


def print_tables(rows: list[dict], header: str) -> None:
    print(f"\n{header}\n")
    print("| data | items | index | search setting | build s | index bytes | RSS growth MB | q/s batched "
          "| q/s single | recall@10 |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "index" in r:
            print(f"| {r['data']} | {r['n']:,} | {r['index']} | {r['setting']} | {r['build_s']:.1f} | {r['size']:,} "
                  f"| {r['rss'] / 2**20:,.0f} | {r['batched']:,.0f} | {r['single']:,.0f} | {r['recall']:.3f} |")
    print("\n`measure_recall(index, embeddings, k=10, sample=1000)` at the default search settings "
          "(indexed items as queries, what an export stores):\n")
    print("| data | items | index | measure_recall | its time s | `auto` builds |")
    print("|---|---:|---|---:|---:|---|")
    seen = set()
    for r in rows:
        if "index" in r and (r["data"], r["n"], r["index"]) not in seen:
            seen.add((r["data"], r["n"], r["index"]))
            auto = next(x["auto"] for x in rows if "auto" in x and (x["data"], x["n"]) == (r["data"], r["n"]))
            value, seconds = r["measured"]
            print(f"| {r['data']} | {r['n']:,} | {r['index']} | {value:.4f} | {seconds:.1f} | {auto} |")


def main() -> int:
    import faiss

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--centres", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--ef", default="32,64,128,256")
    parser.add_argument("--nprobe", default="8,16,32,64")
    parser.add_argument("--exact-limit", type=int, default=200_000)
    parser.add_argument("--kinds", default="hnsw,ivfpq", help="approximate kinds to build (flat always is)")
    parser.add_argument("--real", action="append", default=[], help="NAME=path/to/embeddings.npy (repeatable)")
    args = parser.parse_args()
    ef_values = [int(v) for v in args.ef.split(",")]
    nprobe_values = [int(v) for v in args.nprobe.split(",")]
    kinds = tuple(args.kinds.split(","))

    started = time.perf_counter()
    header = (f"FAISS {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads, "
              f"{os.cpu_count()} CPUs, niceness {os.nice(0)}, k={K}, {N_QUERIES} queries")
    print(header, flush=True)
    rows: list[dict] = []
    queries = make_clustered(N_QUERIES, args.dim, args.centres, args.spread, seed=1)
    for n in (int(s) for s in args.sizes.split(",")):
        gallery = make_clustered(n, args.dim, args.centres, args.spread, seed=0)
        rows += bench_collection(f"clustered-{args.centres}", gallery, queries, ef_values, nprobe_values,
                                 args.exact_limit, kinds)
        del gallery
        gc.collect()
    for spec in args.real:
        name, _, path = spec.partition("=")
        gallery = np.ascontiguousarray(np.load(path), dtype=np.float32)
        pick = np.random.default_rng(0).choice(len(gallery), size=min(N_QUERIES, len(gallery)), replace=False)
        rows += bench_collection(name, gallery, gallery[pick], ef_values, nprobe_values, args.exact_limit, kinds)
    print_tables(rows, header)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
