"""Bench 19 (distillation): images/s of a teacher and its students, side by side in one process.

Every model is an image-level embedding model of the run (RGB pixels in, unit embedding out: the file phase 4
re-embeds with and export bundles), named by its embeddings tag. The same test images are decoded and resized to
each model's input size before the clock starts, so what is timed is the network alone. Rounds alternate the
models (every model once per round) so that a change of load on the shared machine hits all of them alike; the
median of the rounds is reported, with the ratio to the first model (the teacher) and the load average before and
after. Run it at nice 0 (it records its own nice value): the point is the ratio on these cores.

    python bench/bench_distill_speed.py --run flowers102-distill \
        --model mobilenet-a0.25-224-imagenet+arcface --model mobilenet-a0.25-128-imagenet+distill \
        --model mobilenet-a0.25-96-imagenet+distill [--images 256] [--batch 32] [--rounds 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def model_file(run_root: Path, tag: str) -> Path:
    """The image-level model behind embeddings `tag` (a trained model's, or an exported head's)."""
    meta = json.loads((run_root / "embeddings" / tag / "meta.json").read_text())
    if not meta.get("trained"):
        raise SystemExit(f"{tag}: not a trained model (pretrained backbones have no embedding_model.keras)")
    path = run_root / "train" / meta["base_tag"] / meta["loss"] / "embedding_model.keras"
    if not path.is_file():
        raise SystemExit(f"{tag}: {path} missing (a head-mode model needs train.export on)")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--model", action="append", required=True, metavar="TAG",
                        help="embeddings tag of a trained model; the first is the reference (the teacher)")
    parser.add_argument("--images", type=int, default=256, help="test images timed per model and round")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    import keras

    import models.classifier  # noqa: F401  (custom objects for load_model)
    import models.heads  # noqa: F401
    import models.layers  # noqa: F401
    from pipeline.config import load_config
    from pipeline.core.run_dir import RunDir
    from pipeline.data.tfrecords import plain_images, read_records

    run_root = Path(args.runs_dir) / args.run
    run_dir = RunDir(load_config(str(run_root / "config.yaml"), [f"runs_dir={args.runs_dir}"]))
    _, encoded = read_records(run_dir.dataset_dir, ("test",))
    encoded = encoded[:args.images]
    models, inputs = {}, {}
    for tag in args.model:
        model = keras.saving.load_model(model_file(run_root, tag), compile=False)
        size = int(model.inputs[0].shape[1])
        if size not in inputs:
            inputs[size] = np.concatenate([b.numpy() for b in plain_images(encoded, size, args.batch)])
        models[tag] = (model, inputs[size])
        model.predict(inputs[size][:args.batch], batch_size=args.batch, verbose=0)   # warm-up: tracing

    load_before = os.getloadavg()
    rates: dict[str, list[float]] = {tag: [] for tag in models}
    for _ in range(args.rounds):
        for tag, (model, images) in models.items():
            started = time.perf_counter()
            model.predict(images, batch_size=args.batch, verbose=0)
            rates[tag].append(len(images) / (time.perf_counter() - started))
    load_after = os.getloadavg()

    reference = statistics.median(rates[args.model[0]])
    rows = [{"model": tag, "image_size": int(models[tag][0].inputs[0].shape[1]),
             "images_per_second": statistics.median(r), "min": min(r), "max": max(r),
             "speedup_vs_first": statistics.median(r) / reference} for tag, r in rates.items()]
    result = {"images": len(encoded), "batch": args.batch, "rounds": args.rounds, "nice": os.nice(0),
              "cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": load_after,
              "rows": rows}
    print(f"{len(encoded)} test images, batch {args.batch}, {args.rounds} alternating rounds, nice {result['nice']}, "
          f"load {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print("| model | px | images/s (median) | range | × first |")
    print("|---|---:|---:|---|---:|")
    for row in rows:
        print(f"| {row['model']} | {row['image_size']} | {row['images_per_second']:.0f} | "
              f"{row['min']:.0f}–{row['max']:.0f} | {row['speedup_vs_first']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
