"""Issue 3, evidence 2: training throughput of each metric-learning loss vs plain softmax cross-entropy.

Head mode (default): the same embedding head (Dense(512) → BN → L2) on the same
class-balanced P×K batches of synthetic pooled features. Finetune mode (`--mode finetune`):
the phase-3 finetune model (MobileNet 0.25 trunk with its last 20 layers trainable + head)
on P×K batches of synthetic images held in memory (decoding is not timed). The baseline
adds a Dense softmax classifier trained with sparse categorical cross-entropy. Every model is built and
warmed up first, then
timed runs alternate across models (median of `--repeats`). Overhead = baseline steps/s
÷ loss steps/s − 1 (goal < 10 %), from the medians and from the best runs (on a shared
machine the best run is the one least disturbed by other jobs).

    python bench/bench_loss_overhead.py [--dim 256 --classes 50 --steps 200 --repeats 5] [--jit]
    python bench/bench_loss_overhead.py --mode finetune --size 128 --steps 20 --repeats 3 --jit
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=256, help="feature size (MobileNet 0.25: 256, ResNet50: 2048)")
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--p", type=int, default=16)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--jit", action="store_true", help="compile train steps with XLA")
    parser.add_argument("--only", default="", help="comma-separated losses (default: all)")
    parser.add_argument("--mode", choices=["head", "finetune"], default="head")
    parser.add_argument("--size", type=int, default=128, help="finetune mode: image side in pixels")
    args = parser.parse_args()

    import keras
    import numpy as np

    from models.classifier import CosineClassifier
    from models.heads import build_embedding_head
    from models.losses import LOSSES, get_loss, triplet_accuracy
    from pipeline.training.sampler import balanced_batches

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.classes, args.dim)).astype(np.float32)
    labels = np.repeat(np.arange(args.classes), args.per_class)
    features = np.abs(centres[labels] + 2.0 * rng.standard_normal((len(labels), args.dim)).astype(np.float32))
    if args.mode == "head":
        batches = balanced_batches(features, labels, args.p, args.k, seed=0)

        def embedding_model():
            return build_embedding_head(args.dim, 512)
    else:
        import tensorflow as tf

        from pipeline.config import BackboneConfig
        from pipeline.training.finetune import build_finetune_model

        batch_size = args.p * args.k
        images = rng.uniform(0, 255, (8, batch_size, args.size, args.size, 3)).astype(np.float32)
        batch_labels = np.repeat(np.arange(args.p), args.k).astype(np.int32)
        batches = tf.data.Dataset.from_tensor_slices((images, np.stack([batch_labels] * 8))).repeat()

        def embedding_model():
            backbone = BackboneConfig(name="mobilenet", alpha=0.25, image_size=args.size, weights="none")
            return build_finetune_model(backbone, 512, finetune_layers=20)[0]

    models = {}
    names = [n for n in args.only.split(",") if n] or list(LOSSES)
    for name in ["softmax_ce", *names]:
        keras.utils.set_random_seed(0)
        head = embedding_model()
        if name == "softmax_ce":
            logits = keras.layers.Dense(args.classes)(head.output)
            model = keras.Model(head.input, logits)
            model.compile(keras.optimizers.AdamW(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          jit_compile=args.jit)
        elif LOSSES[name].requires_classifier:
            model = keras.Model(head.input, CosineClassifier(args.classes)(head.output))
            model.compile(keras.optimizers.AdamW(1e-3), get_loss(name), jit_compile=args.jit)
        else:
            model = head
            model.compile(keras.optimizers.AdamW(1e-3), get_loss(name), metrics=[triplet_accuracy],
                          jit_compile=args.jit)
        model.fit(batches, steps_per_epoch=min(20, args.steps), epochs=1, verbose=0)  # trace and warm up
        models[name] = model

    rates = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            started = time.perf_counter()
            model.fit(batches, steps_per_epoch=args.steps, epochs=1, verbose=0)
            rates[name].append(args.steps / (time.perf_counter() - started))
    base = statistics.median(rates["softmax_ce"])
    what = f"features {args.dim}-d" if args.mode == "head" else f"finetune, MobileNet 0.25 @{args.size} px"
    print(f"\n{what}, batch {args.p}×{args.k}, {args.steps} steps × {args.repeats} alternating runs"
          f"{', XLA' if args.jit else ''}")
    best_base = max(rates["softmax_ce"])
    print("| loss | steps/s (median) | overhead (medians) | steps/s (best run) | overhead (best runs) | runs |")
    print("|---|---:|---:|---:|---:|---|")
    for name, values in rates.items():
        median, best = statistics.median(values), max(values)
        print(f"| {name} | {median:.2f} | {base / median - 1:+.1%} | {best:.2f} | {best_base / best - 1:+.1%} "
              f"| {', '.join(f'{v:.2f}' for v in values)} |")


if __name__ == "__main__":
    main()
