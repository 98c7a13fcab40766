"""Evaluation at scale (issue 13, BENCHMARKS 18): embedlab's exact full-ranking evaluation next to the k-NN way
peer libraries evaluate (bench/peer_knn_eval.py, pytorch-metric-learning's AccuracyCalculator), in one run.

    python bench/bench_eval_scale.py synthetic --data /tmp/scale [--n 1000000 --dim 512 --queries 10000]
    python bench/bench_eval_scale.py cifar --embeddings RUNS/cifar60k/embeddings/mobilenet-a0.25-96-imagenet

Cases:
* synthetic: `--n` x `--dim` clustered unit vectors (bench/bench_index.make_clustered, `--centres` classes),
  written once as `.npy` under `--data` (float32, and float16 for the `embedlab-f16` way); `--queries` of them
  drawn stratified by class with a seed (what `evaluate.max_queries` does), each left out of its own ranking.
* cifar: a phase-1 run's unit embeddings (real MobileNet features): the test split's queries against every item,
  leave-one-out (phase 2's CIFAR-10 protocol).

Ways, each run in its own process (peak RSS = that process's ru_maxrss), alternating with `--repeat`:
* embedlab: the gallery memory-mapped (pipeline.vectors.gallery.open_gallery), `retrieve` (cosine: P@1, P@k, R@k,
  full-ranking mAP, MAP@R, R-precision, top-k lists, k-occurrence) and the 500-query unit/euclidean identity
  check phase 2 runs. `--diagnostics` adds embedding_diagnostics of the whole gallery, timed apart.
* embedlab-rows: the same with `scan="rows"`: whole score rows, a memory budget of them in flight (what
  `retrieve` did for every gallery before the segment scan; `auto` scans segments from 200,000 items).
* embedlab-f16: the same on the float16 copy of the gallery (float32 accumulation).
* peer: FAISS exact k-NN (IndexFlatIP, k = the largest class + 1), fed from the same memory-mapped file block by
  block (FAISS keeps its own float32 copy), then P@1, R-precision, MAP@R (and AP over the k retrieved) from the
  neighbour labels.
Afterwards the per-query numbers are compared: where the two must agree (P@1, R-precision, MAP@R) and how far the
float16 gallery moves anything. Each process prints its progress on stderr; the tables go to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IDENTITY_SAMPLE = 500
WAYS = ("embedlab", "embedlab-rows", "embedlab-f16", "peer")


def prepare_synthetic(data: Path, args: argparse.Namespace) -> None:
    from bench.bench_index import make_clustered
    from pipeline.vectors.projections import stratified_sample

    data.mkdir(parents=True, exist_ok=True)
    if (data / "gallery.npy").is_file() and (data / "meta.json").is_file():
        meta = json.loads((data / "meta.json").read_text())
        if meta == {"n": args.n, "dim": args.dim, "centres": args.centres, "spread": args.spread,
                    "queries": args.queries}:
            return
    print(f"making {args.n:,} x {args.dim} clustered unit vectors in {data}", file=sys.stderr, flush=True)
    x, labels = make_clustered(args.n, args.dim, args.centres, args.spread, seed=0, return_labels=True)
    np.save(data / "gallery.npy", x)
    np.save(data / "gallery_f16.npy", x.astype(np.float16))
    np.save(data / "labels.npy", labels)
    np.save(data / "queries.npy", stratified_sample(labels, args.queries, seed=0))
    (data / "meta.json").write_text(json.dumps({"n": args.n, "dim": args.dim, "centres": args.centres,
                                                "spread": args.spread, "queries": args.queries}))


def prepare_cifar(data: Path, embeddings: Path) -> None:
    import pandas as pd

    data.mkdir(parents=True, exist_ok=True)
    items = pd.read_csv(embeddings / "items.csv")
    unit = np.load(embeddings / "embeddings.npy").astype(np.float32)
    np.save(data / "gallery.npy", unit)
    np.save(data / "gallery_f16.npy", unit.astype(np.float16))
    np.save(data / "labels.npy", items["label"].to_numpy(np.int64))
    np.save(data / "queries.npy", np.flatnonzero(items["split"].to_numpy(str) == "test"))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_file_mb() -> float:
    """Resident pages of mapped files now (the memory-mapped gallery), from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(way: str, data: Path, k: int, diagnostics: bool) -> dict:
    labels = np.load(data / "labels.npy")
    queries = np.load(data / "queries.npy")
    out: dict = {"way": way}
    if way == "peer":
        from bench.peer_knn_eval import knn_metrics

        gallery = np.load(data / "gallery.npy", mmap_mode="r")
        started = time.perf_counter()
        query = np.asarray(gallery[queries], dtype=np.float32)
        found = knn_metrics(query, labels[queries], gallery, labels, query_ids_in_reference=queries)
        out["wall_s"] = time.perf_counter() - started
        per_query = found.pop("per_query")
        found.pop("first_neighbour")
        out["metrics"] = found
        np.savez(data / f"per_query_{way}.npz", **per_query)
    else:
        from pipeline.vectors.gallery import open_gallery
        from pipeline.vectors.retrieval import retrieve
        from pipeline.vectors.unit_identity import check_unit_identity

        gallery = open_gallery(data / ("gallery_f16.npy" if way == "embedlab-f16" else "gallery.npy"))
        started = time.perf_counter()
        query = np.asarray(gallery[queries], dtype=np.float32)
        scan = "rows" if way == "embedlab-rows" else "auto"
        result = retrieve(query, labels[queries], gallery, labels, metric="cosine", k=k, exclude=queries,
                          progress=True, scan=scan)
        identity = check_unit_identity(query, labels[queries], gallery, labels, result, k=k, exclude=queries,
                                       sample_size=IDENTITY_SAMPLE, scan=scan)
        out["wall_s"] = time.perf_counter() - started
        out["metrics"] = result.metrics
        out["identity"] = identity.as_dict()
        out["rss_file_mb_after_retrieval"] = rss_file_mb()
        out["peak_rss_mb_retrieval"] = peak_rss_mb()
        np.savez(data / f"per_query_{way}.npz", neighbours=result.neighbours, **result.per_query)
        if diagnostics:
            from pipeline.vectors.diagnostics import embedding_diagnostics

            started = time.perf_counter()
            found = embedding_diagnostics(gallery, labels, k_occurrence=result.k_occurrence)
            out["diagnostics_s"] = time.perf_counter() - started
            out["effective_rank"] = found["effective_rank"]
    out["peak_rss_mb"] = peak_rss_mb()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # CPU seconds of the whole child (threads included): on a shared machine, the work itself.
    out["cpu_s"] = usage.ru_utime + usage.ru_stime
    out["n_queries"] = int(len(queries))
    out["gallery"] = int(len(labels))
    return out


def compare(data: Path) -> list[str]:
    """Per-query agreement: embedlab vs the k-NN way, float16 vs float32."""
    lines = []
    ours = np.load(data / "per_query_embedlab.npz") if (data / "per_query_embedlab.npz").is_file() else None
    peer = np.load(data / "per_query_peer.npz") if (data / "per_query_peer.npz").is_file() else None
    half = np.load(data / "per_query_embedlab-f16.npz") if (data / "per_query_embedlab-f16.npz").is_file() else None
    if ours is not None and peer is not None:
        evaluated = peer["evaluated"]
        for name in ("P@1", "R-precision", "MAP@R"):
            a, b = ours[name][evaluated], peer[name][evaluated].astype(np.float64)
            lines.append(f"- {name}: embedlab {a.mean():.6f} vs k-NN {b.mean():.6f}; queries differing: "
                         f"{int((np.abs(a - b) > 1e-9).sum())} of {int(evaluated.sum())}, largest difference "
                         f"{np.abs(a - b).max(initial=0):.2e}")
    if ours is not None and half is not None:
        same_lists = np.all(ours["neighbours"] == half["neighbours"], axis=1)
        lines.append(f"- float16 gallery vs float32: identical top-k lists {int(same_lists.sum())} of "
                     f"{len(same_lists)}")
        for name in ("P@1", "MAP@R", "AP", "R-precision"):
            a, b = ours[name], half[name]
            ok = ~np.isnan(a)
            lines.append(f"  - {name}: mean {np.nanmean(a):.6f} vs {np.nanmean(b):.6f}, queries differing "
                         f"{int((np.abs(a[ok] - b[ok]) > 1e-12).sum())}, largest per-query difference "
                         f"{np.abs(a[ok] - b[ok]).max(initial=0):.2e}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", choices=("synthetic", "cifar"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/embedlab_scale"), help="where the .npy files go")
    parser.add_argument("--embeddings", type=Path, help="cifar: a phase-1 embeddings folder")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--centres", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--ways", default="embedlab,peer", help="comma-separated: " + ", ".join(WAYS))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--diagnostics", action="store_true")
    parser.add_argument("--prepare-only", action="store_true", help="write the data files and stop")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    data = args.data / args.case

    if args.child:
        print(json.dumps(child(args.child, data, args.k, args.diagnostics)))
        return
    if args.case == "synthetic":
        prepare_synthetic(data, args)
    elif args.embeddings is not None:
        prepare_cifar(data, args.embeddings)
    elif not (data / "gallery.npy").is_file():
        parser.error("cifar needs --embeddings (once: the files are kept under --data)")
    if args.prepare_only:
        return

    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeat):
        for way in args.ways.split(","):
            if way not in WAYS:
                parser.error(f"unknown way {way!r}")
            load = os.getloadavg()[0]
            command = [sys.executable, __file__, args.case, "--data", str(args.data), "--child", way,
                       "--k", str(args.k)] + (["--diagnostics"] if args.diagnostics else [])
            completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
            row = json.loads(completed.stdout.strip().splitlines()[-1])
            row["load"] = (load, os.getloadavg()[0])
            runs.setdefault(way, []).append(row)
            print(f"{way}: {json.dumps({k: v for k, v in row.items() if k != 'way'})}", file=sys.stderr, flush=True)

    first = next(iter(runs.values()))[0]
    print(f"\n{args.case}: {first['n_queries']:,} queries x {first['gallery']:,} gallery\n")
    print("| way | runs: wall (s) | median wall (s) | queries/s | CPU (s) | median peak RSS (MB) | load (1 min) "
          "| P@1 | R-precision | MAP@R | mAP (full ranking) |")
    print("|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for way, rows in runs.items():
        wall = statistics.median(r["wall_s"] for r in rows)
        m = rows[0]["metrics"]
        full_map = f"{m['mAP']:.4f}" if "mAP" in m else f"— (AP@k_max {m['AP@k_max']:.4f})"
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in rows)
        print(f"| {way} | {walls} | {wall:.1f} "
              f"| {rows[0]['n_queries'] / wall:,.0f} | {statistics.median(r.get('cpu_s', np.nan) for r in rows):.0f} "
              f"| {statistics.median(r['peak_rss_mb'] for r in rows):,.0f} "
              f"| {min(r['load'][0] for r in rows):.1f}–{max(r['load'][1] for r in rows):.1f} "
              f"| {m['P@1']:.4f} | {m['R-precision']:.4f} | {m['MAP@R']:.4f} | {full_map} |")
    for way, rows in runs.items():
        extra = {key: rows[0][key] for key in ("identity", "rss_file_mb_after_retrieval", "peak_rss_mb_retrieval",
                                               "diagnostics_s", "effective_rank") if key in rows[0]}
        if extra:
            print(f"\n{way}: {json.dumps(extra)}")
        if way == "peer":
            print(f"\npeer: k = {rows[0]['metrics']['k']}, neighbour lists "
                  f"{rows[0]['metrics']['neighbour_list_bytes'] / 2**20:,.0f} MiB")
    print("\n" + "\n".join(compare(data)))


if __name__ == "__main__":
    main()
