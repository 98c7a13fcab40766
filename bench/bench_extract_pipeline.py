"""Bench 1: is the tf.data input pipeline ever the bottleneck of extraction?

Side by side in one process, on the same images: the model fed by the real
pipeline (TFRecord → parallel decode → resize → batch → prefetch) against the bare
model on tensors decoded and resized beforehand. Ratio = pipeline / bare throughput
(goal ≥ 0.9). Runs alternate (bare, pipeline, bare, …) and medians are quoted.

    python bench/bench_extract_pipeline.py [--images 512] [--backbone mobilenet --alpha 0.25 --size 224]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared/data/clothing10"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--backbone", default="mobilenet")
    parser.add_argument("--alpha", type=float, default=0.25)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import tensorflow as tf

    from models.backbones import build_feature_extractor
    from pipeline.config import load_config
    from pipeline.data.record_reader import list_shards
    from pipeline.data.tfrecords import decode_and_resize, image_dataset
    from pipeline.phases.ingest import run_ingest
    from pipeline.data.schema import parse

    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    per_class = max(1, args.images // 10)
    config = load_config(None, [f"data.source={args.source}", f"data.limit_per_class={per_class}",
                                "data.ratios=1.0,0.0,0.0", f"data.tfrecords_dir={work}", "data.shard_size=256",
                                f"runs_dir={work}/runs"])
    shards = list_shards(run_ingest(config), "train")

    extractor = build_feature_extractor(args.backbone, weights="none", image_size=args.size, alpha=args.alpha)
    model = extractor.model
    # The bare model's input: every image decoded and resized once, ahead of time.
    records = tf.data.TFRecordDataset([str(s) for s in shards]).map(parse)
    decoded = np.stack([decode_and_resize(r["image"], args.size).numpy() for r in records])
    n = len(decoded)
    model.predict(decoded[: args.batch], verbose=0)                       # build/trace once
    model.predict(image_dataset(shards[:1], args.size, args.batch).take(1), verbose=0)

    # The bare model reads the already-decoded tensors from memory through the same
    # predict loop (a numpy array would add Keras's slow array adapter and flatter the pipeline).
    in_memory = tf.data.Dataset.from_tensor_slices(tf.constant(decoded)).batch(args.batch).prefetch(1)
    bare, piped = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        model.predict(in_memory, verbose=0)
        bare.append(n / (time.perf_counter() - t))
        t = time.perf_counter()
        model.predict(image_dataset(shards, args.size, args.batch), verbose=0)
        piped.append(n / (time.perf_counter() - t))
    b, p = statistics.median(bare), statistics.median(piped)
    print("| backbone | images | bare img/s | pipeline img/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    print(f"| {args.backbone}{' a' + str(args.alpha) if args.backbone == 'mobilenet' else ''} @{args.size} "
          f"| {n} | {b:.1f} | {p:.1f} | {p / b:.2f} |")
    print(f"runs bare: {[round(x, 1) for x in bare]}  pipeline: {[round(x, 1) for x in piped]}")


if __name__ == "__main__":
    main()
