"""Bench 9: CLIP throughput on the CPU — phase 1's pipeline vs the bare model, XLA, ONNX Runtime, text.

Side by side in one process (random weights: speed does not depend on their values):
  1. ViT-B/32 image embeddings through phase 1's reader (TFRecord -> decode -> resize -> batch ->
     prefetch -> `model.predict`) vs the bare keras-hub model on images decoded beforehand
     (goal: ratio >= 0.9). Runs alternate; medians.
  2. images/s of ViT-B/32 and ViT-B/16 (bare, batch `--batch`).
  3. The faster CPU paths on the same batches: the extractor as a plain `tf.function`, XLA-compiled
     (`jit_compile=True`), and the exported SavedModel under ONNX Runtime (tf2onnx; skipped with a
     note when `tf2onnx`/`onnxruntime` are not installed — they are not dependencies of embedlab).
     Batches and single images (latency, median of `--latency-runs`); max abs difference of the
     embeddings against the Keras model.
  4. Text embeddings/s of the ViT-B/32 text tower, tokenising included.

    python bench/bench_clip_throughput.py [--images 128] [--batch 32] [--b16-images 32]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def alternate(runs: int, **paths):
    """{name: [throughputs]}: every path once per round, rounds repeated `runs` times."""
    results = {name: [] for name in paths}
    for _ in range(runs):
        for name, path in paths.items():
            results[name].append(path())
    return results


def timed(n: int, fn) -> float:
    started = time.perf_counter()
    fn()
    return n / (time.perf_counter() - started)


def latency_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared/data/clothing10"))
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--b16-images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-runs", type=int, default=15)
    parser.add_argument("--texts", type=int, default=512)
    args = parser.parse_args()

    import tensorflow as tf

    from models.backbones import build_feature_extractor
    from pipeline.config import load_config
    from pipeline.data.schema import parse
    from pipeline.data.record_reader import list_shards
    from pipeline.data.tfrecords import decode_and_resize, image_dataset
    from pipeline.phases.ingest import run_ingest

    work = Path(tempfile.mkdtemp(prefix="bench_clip_"))
    config = load_config(None, [f"data.source={args.source}", f"data.limit_per_class={max(1, args.images // 10)}",
                                "data.ratios=1.0,0.0,0.0", f"data.tfrecords_dir={work}", "data.shard_size=256",
                                f"runs_dir={work}/runs"])
    shards = list_shards(run_ingest(config), "train")
    size = 224
    records = tf.data.TFRecordDataset([str(s) for s in shards]).map(parse)
    decoded = np.stack([decode_and_resize(r["image"], size).numpy() for r in records])
    n = len(decoded)
    print(f"{n} images from {args.source}, {size} px, batch {args.batch}, {os.cpu_count()} CPUs")

    # 1 + 2: B/32 pipeline vs bare; B/16 bare.
    b32 = build_feature_extractor("clip-vit-b32", weights="none", with_text=True)
    model = b32.model
    in_memory = tf.data.Dataset.from_tensor_slices(tf.constant(decoded)).batch(args.batch).prefetch(1)
    model.predict(in_memory.take(1), verbose=0)
    model.predict(image_dataset(shards[:1], size, args.batch).take(1), verbose=0)
    runs = alternate(args.repeats,
                     bare=lambda: timed(n, lambda: model.predict(in_memory, verbose=0)),
                     pipeline=lambda: timed(n, lambda: model.predict(image_dataset(shards, size, args.batch),
                                                                     verbose=0)))
    bare, piped = statistics.median(runs["bare"]), statistics.median(runs["pipeline"])
    print("\n| model | images | bare img/s | phase-1 pipeline img/s | ratio | runs (bare / pipeline) |")
    print("|---|---:|---:|---:|---:|---|")
    print(f"| CLIP ViT-B/32 @224 | {n} | {bare:.1f} | {piped:.1f} | {piped / bare:.2f} | "
          f"{', '.join(f'{x:.1f}' for x in runs['bare'])} / {', '.join(f'{x:.1f}' for x in runs['pipeline'])} |")

    # 3: plain tf.function vs XLA vs ONNX Runtime, on the same batches and single images.
    batches = [decoded[i:i + args.batch] for i in range(0, n, args.batch)]
    plain_fn = tf.function(lambda x: model(x, training=False)["embedding"])
    xla_fn = tf.function(lambda x: model(x, training=False)["embedding"], jit_compile=True)
    reference = np.concatenate([np.asarray(model.predict_on_batch(b)["embedding"]) for b in batches])
    paths = {"Keras predict_on_batch": lambda b: np.asarray(model.predict_on_batch(b)["embedding"]),
             "tf.function": lambda b: plain_fn(tf.constant(b)).numpy(),
             "tf.function + XLA": lambda b: xla_fn(tf.constant(b)).numpy()}
    onnx_note = add_onnx_path(model, paths, work, args.batch)
    rows = []
    for name, fn in paths.items():
        for b in batches[:1]:
            fn(b)  # compile / warm up
            fn(b[:1])
        out = np.concatenate([fn(b) for b in batches])
        diff = float(np.abs(out - reference).max())
        speed = alternate(args.repeats, run=lambda fn=fn: timed(n, lambda: [fn(b) for b in batches]))["run"]
        single = latency_ms(lambda fn=fn: fn(decoded[:1]), args.latency_runs)
        rows.append((name, statistics.median(speed), single, diff))
    print(f"\n| ViT-B/32 path | img/s (batch {args.batch}, median of {args.repeats}) | single image ms (median of "
          f"{args.latency_runs}) | max abs diff vs Keras |")
    print("|---|---:|---:|---:|")
    for name, speed, single, diff in rows:
        print(f"| {name} | {speed:.1f} | {single:.0f} | {diff:.1e} |")
    if onnx_note:
        print(onnx_note)

    # B/16: bare only, fewer images (about 4.4x the compute of B/32).
    b16 = build_feature_extractor("clip-vit-b16", weights="none").model
    few = tf.data.Dataset.from_tensor_slices(tf.constant(decoded[:args.b16_images])).batch(args.batch)
    b16.predict(few.take(1), verbose=0)
    b16_runs = alternate(args.repeats, bare=lambda: timed(len(decoded[:args.b16_images]),
                                                          lambda: b16.predict(few, verbose=0)))["bare"]
    print(f"\nCLIP ViT-B/16 @224 bare: {statistics.median(b16_runs):.1f} img/s "
          f"(runs {', '.join(f'{x:.1f}' for x in b16_runs)}, {len(decoded[:args.b16_images])} images)")

    # 4: text embeddings/s (byte-level tokenizer of the random-weights model: one token per byte,
    # longer sequences than CLIP's BPE would give — the text model always runs 77 positions anyway).
    words = ["red", "dress", "shirt", "boots", "a", "photo", "of", "cotton", "summer", "jacket", "with", "pockets"]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=8)) for _ in range(args.texts)]
    b32.text.embed(texts[:64])
    text_runs = alternate(args.repeats, run=lambda: timed(len(texts), lambda: b32.text.embed(texts)))["run"]
    print(f"CLIP ViT-B/32 text tower: {statistics.median(text_runs):.1f} texts/s "
          f"(runs {', '.join(f'{x:.1f}' for x in text_runs)}, {len(texts)} texts, batch 256, tokenising included)")


def add_onnx_path(model, paths: dict, work: Path, batch: int) -> str:
    """Export the extractor, convert it with tf2onnx and add an ONNX Runtime path; a note when not possible."""
    try:
        import onnxruntime  # noqa: F401
        import tf2onnx  # noqa: F401
    except ImportError as exc:
        return f"ONNX Runtime path skipped: {exc} (pip install tf2onnx onnxruntime to measure it)"
    import onnxruntime

    saved = work / "saved_model"
    model.export(str(saved), format="tf_saved_model", verbose=False)
    onnx_file = work / "clip_b32.onnx"
    done = subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved), "--output",
                           str(onnx_file), "--opset", "17", "--signature_def", "serving_default"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return f"ONNX Runtime path skipped: tf2onnx failed: {done.stderr.strip().splitlines()[-1]}"
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    embedding_output = next((name for name in outputs if "embedding" in name), outputs[-1])
    paths["ONNX Runtime (tf2onnx, opset 17)"] = lambda b: session.run(
        [embedding_output], {input_name: np.asarray(b, np.float32)})[0]
    return ""


if __name__ == "__main__":
    main()
