"""Latency of the HTTP API from a separate process on loopback (wrk), against the same work done in-process.

    .venv/bin/python bench/bench_serving.py [--items 100000] [--duration 10] [--json out.json]

Bundles (built once into --work, default $TMPDIR/embedlab-bench-serving, reused when present):
  image: MobileNet 0.25 at 224 px with real ImageNet weights (KERAS_HOME, default ../shared/keras), 256-d;
         300 clothing10 images (30 per class) embedded by the exported SavedModel, plus clustered synthetic unit
         vectors (bench/bench_index.make_clustered: 1,000 centres) up to --items, all in one flat index.
  text:  the tiny Hugging Face CLIP of tests/fixtures/hf_clip_tiny (16-d; text tower of 2 layers, width 8), the
         same number of clustered synthetic vectors; queries are short product phrases.
Each configuration runs `serve` (uvicorn, one worker) in a child process; wrk (Debian's) sends, one connection
(concurrency 1) then eight (concurrency 8), --duration seconds each after a warm-up, cycling over 16 query
images (multipart, built by a generated Lua script) or 16 JSON texts. In-process: the same Searcher calls a
request makes (embed one image or text + search k=10), timed in this process between the HTTP runs, with the
server idle. Server overhead = HTTP p50 at concurrency 1 minus the in-process p50.

The whole run lowers its priority (--nice, default 10) because other jobs share the 2 cores; the load average
before each run is recorded with it.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = REPO.parent / "shared"
CLIP_FIXTURE = REPO / "tests" / "fixtures" / "hf_clip_tiny"
TEXTS = ["red floral dress", "blue denim jeans", "black leather shoes", "white cotton t-shirt", "wool winter hat",
         "striped long sleeve shirt", "green summer skirt", "grey hooded jacket", "running shoes size 42",
         "short beige pants", "silk evening dress", "kids t-shirt with print", "warm outwear coat",
         "checked shirt", "yellow shorts", "pleated skirt"]


def clothing_images(per_class: int) -> list[tuple[str, str, bytes]]:
    folder = SHARED / "data" / "clothing10"
    if not folder.is_dir():
        sys.exit(f"{folder} is not there: the image bench needs the clothing10 set")
    out = []
    for label_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(label_dir.iterdir())[:per_class]:
            out.append((label_dir.name, path.name, path.read_bytes()))
    return out


def placeholder_thumbnail() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), (180, 180, 180)).save(out, format="PNG")
    return out.getvalue()


def collection(real_vectors: np.ndarray, real_rows: list[dict], real_thumbs: list[bytes], n_items: int):
    """Real rows first, then clustered synthetic unit vectors (placeholder thumbnails) up to n_items."""
    import pandas as pd

    from bench.bench_index import make_clustered

    n_synthetic = n_items - len(real_rows)
    synthetic = make_clustered(n_synthetic, real_vectors.shape[1], n_centres=1000, spread=0.6, seed=7)
    rows = real_rows + [{"id": f"syn-{i:06d}", "label": -1, "label_name": "synthetic", "path": "", "text": "",
                         "group": "", "split": "synthetic"} for i in range(n_synthetic)]
    thumbs = real_thumbs + [placeholder_thumbnail()] * n_synthetic
    return pd.DataFrame(rows), np.concatenate([real_vectors, synthetic]).astype(np.float32), thumbs


def build_image_bundle(root: Path, n_items: int) -> list[bytes]:
    """The MobileNet bundle; returns the query images (16 clothing images not in the collection)."""
    from models.backbones import build_feature_extractor
    from pipeline.serving.bundle import write_bundle
    from pipeline.serving.serving_model import ImageEmbedder, embedding_output, write_image_saved_model
    from pipeline.serving.thumbnails import make_thumbnail

    images = clothing_images(per_class=32)
    queries = [data for i, (_, _, data) in enumerate(images) if i % 32 >= 30][:16]
    kept = [item for i, item in enumerate(images) if i % 32 < 30]
    if not (root / "CURRENT").exists():
        extractor = build_feature_extractor("mobilenet", alpha=0.25, image_size=224, weights="imagenet")
        model_dir = root.parent / "mobilenet-image-model"
        shutil.rmtree(model_dir, ignore_errors=True)
        write_image_saved_model(embedding_output(extractor.model), model_dir)
        vectors, errors, normalised = ImageEmbedder(model_dir).embed([data for _, _, data in kept])
        assert not errors, errors
        rows = [{"id": f"{label}-{name.split('.')[0][:8]}", "label": i // 30, "label_name": label,
                 "path": f"{label}/{name}", "text": "", "group": "", "split": "real"}
                for i, (label, name, _) in enumerate(kept)]
        items, vectors, thumbs = collection(vectors, rows, [make_thumbnail(d) for d in normalised], n_items)
        write_bundle(root, items, vectors, thumbs, model_dir, {"backbone": "mobilenet-a0.25-224-imagenet",
                                                               "loss": "none"}, index_kind="flat")
    return queries


def build_text_bundle(root: Path, n_items: int) -> None:
    from models.backbones import build_feature_extractor
    from pipeline.serving.bundle import write_bundle
    from pipeline.serving.serving_model import embedding_output, write_image_saved_model, write_text_saved_model

    if (root / "CURRENT").exists():
        return
    extractor = build_feature_extractor("clip", weights="imagenet", image_size=32,
                                        params={"preset": str(CLIP_FIXTURE)}, with_text=True)
    write_image_saved_model(embedding_output(extractor.model), root.parent / "clip-image-model")
    write_text_saved_model(extractor.text, root.parent / "clip-text-model")
    vectors = extractor.text.embed(TEXTS).embedding.astype(np.float32)
    rows = [{"id": f"text-{i:02d}", "label": i, "label_name": t.split()[-1], "path": "", "text": t, "group": "",
             "split": "real"} for i, t in enumerate(TEXTS)]
    items, vectors, thumbs = collection(vectors, rows, [placeholder_thumbnail()] * len(rows), n_items)
    write_bundle(root, items, vectors, thumbs, root.parent / "clip-image-model",
                 {"backbone": "clip-tiny-fixture", "loss": "none"}, text_model=root.parent / "clip-text-model",
                 index_kind="flat")


def in_process(root: Path, queries: list, kind: str, reps: int, faiss_threads: int) -> tuple[dict, list]:
    """p50/p99 (ms) of what one request does, called directly: embed one query + search k=10; and the
    queries' embeddings (for the vector-query probe)."""
    import faiss

    from pipeline.serving.api import load_searcher

    faiss.omp_set_num_threads(faiss_threads or os.cpu_count())   # as the server sets it

    searcher = load_searcher(root)
    query_vectors = [np.asarray(searcher.embed_images([q])[0] if kind == "image" else searcher.embed_texts([q]))
                     .reshape(-1).tolist() for q in queries]
    embed = searcher.embed_images if kind == "image" else searcher.embed_texts
    timings, embed_only, search_only = [], [], []
    for i in range(reps):
        query = queries[i % len(queries)]
        start = time.perf_counter()
        vectors = embed([query])
        middle = time.perf_counter()
        vectors = vectors[0] if kind == "image" else vectors
        searcher.search(vectors, k=10)
        end = time.perf_counter()
        timings.append(end - start)
        embed_only.append(middle - start)
        search_only.append(end - middle)
    ms = {name: 1000 * np.asarray(values) for name, values in
          (("total", timings), ("embed", embed_only), ("search", search_only))}
    return {"p50_ms": float(np.median(ms["total"])), "p99_ms": float(np.percentile(ms["total"], 99)),
            "embed_p50_ms": float(np.median(ms["embed"])), "search_p50_ms": float(np.median(ms["search"])),
            "reps": reps, "faiss_threads": faiss_threads}, query_vectors


def lua_script(path: Path, bodies: list[bytes], content_type: str) -> Path:
    """A wrk script cycling over pre-built POST bodies (Lua strings are byte strings)."""
    def literal(data: bytes) -> str:
        return '"' + "".join(f"\\{b}" for b in data) + '"'

    lines = ["local bodies = {"] + [f"  {literal(b)}," for b in bodies] + ["}", "local i = 0",
             "request = function()", "  i = i % #bodies + 1",
             f'  return wrk.format("POST", nil, {{["Content-Type"] = "{content_type}"}}, bodies[i])', "end"]
    path.write_text("\n".join(lines))
    return path


def multipart(data: bytes, boundary: str = "embedlab-bench-boundary") -> bytes:
    return (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, batching: dict, port: int, faiss_threads: int) -> subprocess.Popen:
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
            "from pipeline.serving.api import Batching, ServeOptions, serve\n"
            f"serve({str(root)!r}, port={port}, options=ServeOptions(batching=Batching(**{batching!r}), "
            f"faiss_threads={faiss_threads}))\n")
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server died: {server.stderr.read().decode()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    sys.exit("the server did not start in 180 s")


def run_wrk(url: str, script: Path | None, connections: int, duration: int) -> dict:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "--latency",
               *(["-s", str(script)] if script else []), url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    percentiles = {p: _ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {"connections": connections, "p50_ms": percentiles["50"], "p90_ms": percentiles["90"],
            "p99_ms": percentiles["99"], "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]),
            "requests": int(re.search(r"(\d+) requests in", out)[1]), "non_2xx": int(errors[1]) if errors else 0,
            "socket_errors": socket_errors[1] if socket_errors else "", "load_before": os.getloadavg()[0]}


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value).groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def http_runs(root: Path, script: Path, path: str, batching: dict, duration: int, concurrencies,
              faiss_threads: int = 1, probes: tuple = ()) -> list[dict]:
    """wrk runs against one server; `probes` are extra (label, path, script or None) runs at concurrency 1."""
    port = free_port()
    server = start_server(root, batching, port, faiss_threads)
    plan = [("query", path, script, c) for c in concurrencies] + [(*probe, 1) for probe in probes]
    try:
        run_wrk(f"http://127.0.0.1:{port}{path}", script, 1, 2)   # warm-up: first requests, allocator, connection
        results = []
        for label, url_path, lua, connections in plan:
            result = run_wrk(f"http://127.0.0.1:{port}{url_path}", lua, connections, duration)
            results.append({**result, "probe": label, "batching": batching, "faiss_threads": faiss_threads})
            print(f"  {label} {url_path} c={connections} batching={batching} faiss_threads={faiss_threads}: "
                  f"p50 {result['p50_ms']:.1f} ms, "
                  f"p99 {result['p99_ms']:.1f} ms, {result['requests_per_s']:.1f} req/s "
                  f"(non-2xx {result['non_2xx']}, load {result['load_before']:.1f})", flush=True)
        return results
    finally:
        server.terminate()
        server.wait(30)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--reps", type=int, default=200, help="in-process repetitions")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "embedlab-bench-serving")
    parser.add_argument("--nice", type=int, default=10)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-text", action="store_true")
    args = parser.parse_args(argv)
    # A SIGTERM unwinds like Ctrl-C, so the `finally` that stops a running server child still runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")
    os.nice(max(0, args.nice - os.nice(0)))
    os.environ.setdefault("KERAS_HOME", str(SHARED / "keras"))
    os.environ.setdefault("EMBEDLAB_CACHE", str(args.work / "cache"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args.work.mkdir(parents=True, exist_ok=True)
    report = {"items": args.items, "nice": os.nice(0), "cpus": os.cpu_count(), "runs": []}

    image_root = args.work / f"mobilenet-{args.items}" / "bundle"
    image_root.parent.mkdir(parents=True, exist_ok=True)
    queries = build_image_bundle(image_root, args.items)
    report["image_in_process"], query_vectors = in_process(image_root, queries, "image", args.reps, 1)
    print(f"image, in-process embed+search: {report['image_in_process']}", flush=True)
    report["image_in_process_faiss_all_cores"] = in_process(image_root, queries, "image", args.reps, 0)[0]
    print(f"image, in-process, FAISS on all cores: {report['image_in_process_faiss_all_cores']}", flush=True)
    script = lua_script(args.work / "image.lua", [multipart(q) for q in queries],
                        "multipart/form-data; boundary=embedlab-bench-boundary")
    vector_script = lua_script(args.work / "vector.lua", [json.dumps({"vector": v}).encode()
                                                          for v in query_vectors], "application/json")
    # Probes of the HTTP path without the model: GET /health, and a vector query (search only).
    probes = (("health", "/health", None), ("vector", "/search?k=10", vector_script))
    for batching in ({"enabled": False}, {"enabled": True, "max_batch": 16, "max_wait_ms": 0.0},
                     {"enabled": True, "max_batch": 16, "max_wait_ms": 2.0}):
        for run in http_runs(image_root, script, "/search?k=10", batching, args.duration, (1, 8),
                             probes=() if batching["enabled"] else probes):
            report["runs"].append({"query": "image", **run})
    for run in http_runs(image_root, script, "/search?k=10", {"enabled": False}, args.duration, (1,), faiss_threads=0):
        report["runs"].append({"query": "image", **run})

    if not args.skip_text:
        text_root = args.work / f"clip-{args.items}" / "bundle"
        text_root.parent.mkdir(parents=True, exist_ok=True)
        build_text_bundle(text_root, args.items)
        report["text_in_process"] = in_process(text_root, TEXTS, "text", args.reps, 1)[0]
        print(f"text, in-process embed+search: {report['text_in_process']}", flush=True)
        script = lua_script(args.work / "text.lua", [json.dumps({"text": t}).encode() for t in TEXTS],
                            "application/json")
        for run in http_runs(text_root, script, "/search?k=10", {"enabled": False}, args.duration, (1, 8)):
            report["runs"].append({"query": "text", **run})

    for kind in ("image", "text"):
        local = report.get(f"{kind}_in_process")
        http = {r["probe"]: r for r in report["runs"] if r["query"] == kind and r["connections"] == 1
                and not r["batching"]["enabled"] and r["faiss_threads"] == 1}
        if local and "query" in http:
            report[f"{kind}_server_overhead_p50_ms"] = http["query"]["p50_ms"] - local["p50_ms"]
            print(f"{kind}: server overhead (HTTP p50 c=1 - in-process p50) = "
                  f"{report[f'{kind}_server_overhead_p50_ms']:.2f} ms")
        if local and "vector" in http:
            report[f"{kind}_vector_overhead_p50_ms"] = http["vector"]["p50_ms"] - local["search_p50_ms"]
            print(f"{kind}: vector query over HTTP p50 - in-process search p50 = "
                  f"{report[f'{kind}_vector_overhead_p50_ms']:.2f} ms")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
