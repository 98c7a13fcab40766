"""BENCHMARKS 20: crops from boxes, and ensembles.

1. Makes synthetic composites: each clothing image (../shared/data/clothing10, N per class) scaled to 25-50 % of a
   448 × 448 cluttered background (smooth noise and random rectangles) and pasted at a random position (seeded),
   with two manifests: `whole.csv` (the composite) and `boxes.csv` (the same composites with the pasted box).
2. Whole image vs crop: phases 0-2 on each manifest (MobileNet 0.25 @224, ImageNet weights from KERAS_HOME, every
   item a test query, leave-one-out), P@1 and MAP@R.
3. Store the crop (what phase 0 does) vs store the box and crop at read time: phase 0 time, disk, and the tf.data
   decode throughput phase 1 would see (stored crop: decode + resize; box at read: decode the whole composite,
   crop, resize), median of repeats, with the load average.
4. Ensembles: the crop run with a second backbone (MobileNet 0.25 @160) and `evaluate.ensembles` concat / mean of
   the two, against its members.

    KERAS_HOME=../shared/keras nice -n 19 python bench/bench_crops.py --per-class 60 --out /tmp/crops-bench
    python bench/bench_crops.py --out /tmp/crops-bench --timing      # at nice 0, after the line above
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CANVAS = 448


def make_composites(source: Path, out: Path, per_class: int, seed: int) -> tuple[Path, Path]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    (out / "scenes").mkdir(parents=True, exist_ok=True)
    whole, boxes = [], []
    for label in sorted(p.name for p in source.iterdir() if p.is_dir()):
        files = sorted((source / label).glob("*.jpg"))[:per_class]
        for i, file in enumerate(files):
            # Background: smooth colour noise (an 8 × 8 grid, upsampled) with a few random rectangles.
            grid = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            canvas = Image.fromarray(grid).resize((CANVAS, CANVAS), Image.Resampling.BICUBIC)
            pixels = np.asarray(canvas).copy()
            for _ in range(6):
                x0, y0 = rng.integers(0, CANVAS - 40, 2)
                w, h = rng.integers(20, 160, 2)
                pixels[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, 3)
            canvas = Image.fromarray(pixels)
            with Image.open(file) as img:
                img = img.convert("RGB")
                side = int(CANVAS * rng.uniform(0.25, 0.5))
                scale = side / max(img.size)
                img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                                 Image.Resampling.LANCZOS)
            x = int(rng.integers(0, CANVAS - img.width + 1))
            y = int(rng.integers(0, CANVAS - img.height + 1))
            canvas.paste(img, (x, y))
            name = f"scenes/{label}_{i:04d}.jpg"
            canvas.save(out / name, quality=90)
            whole.append([name, label])
            boxes.append([name, label, x, y, img.width, img.height])
    for table, header, rows in (("whole.csv", ["path", "label"], whole),
                                ("boxes.csv", ["path", "label", "x", "y", "w", "h"], boxes)):
        with open(out / table, "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    return out / "whole.csv", out / "boxes.csv"


def run_phases(manifest: Path, out: Path, run: str, backbones: list[int], ensembles: list[dict]) -> dict:
    """Phases 0-2 (every item a test query); returns {tag: unit/cosine metrics} and phase 0's time."""
    import yaml

    import run as cli

    config = {
        "runs_dir": str(out / "runs"), "reports_dir": str(out / "reports"),
        "data": {"tfrecords_dir": str(out / "tfrecords"), "name": run, "ratios": [0.0, 0.0, 1.0], "workers": 2},
        "extract": {"backbones": [{"name": "mobilenet", "alpha": 0.25, "image_size": s, "weights": "imagenet"}
                                  for s in backbones], "write_json": False},
        "evaluate": {"projections": ["pca"], "grid_queries": 0, "kmeans": False, "ensembles": ensembles},
    }
    path = out / f"{run}.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["--run", run, "--config", str(path)]
    started = time.perf_counter()
    assert cli.main(["phase0", "--source", str(manifest), *args]) == 0
    ingest_s = time.perf_counter() - started
    for phase in ("phase1", "phase2"):
        assert cli.main([phase, *args]) == 0, phase
    scores = {}
    for metrics in sorted((out / "runs" / run / "eval").glob("*/metrics.json")):
        found = json.loads(metrics.read_text())
        scores[metrics.parent.name] = {k: found["retrieval"]["unit/cosine"][k]
                                       for k in ("P@1", "MAP@R", "n_queries_evaluated")}
        scores[metrics.parent.name]["dim"] = found["backbone"]["dim"]
    return {"ingest_s": ingest_s, "scores": scores, "disk_bytes": _disk(out / "tfrecords" / run)}


def _disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.tfrecord"))


def decode_throughput(dataset_dir: Path, boxes: Path | None, size: int = 224, repeats: int = 5) -> float:
    """Median images/s of the decode → (crop) → resize pipeline over every record of `dataset_dir` (whole
    composites cropped at read time when `boxes`, the manifest with the boxes, is given)."""
    import tensorflow as tf

    from pipeline.data import schema
    from pipeline.data.record_reader import list_shards
    from pipeline.data.tfrecords import decode_and_resize

    shards = [str(p) for p in list_shards(dataset_dir, "test")]
    if boxes is None:
        ds = tf.data.TFRecordDataset(shards).map(lambda s: decode_and_resize(schema.parse(s)["image"], size),
                                                 num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        with open(boxes) as f:
            by_name = {Path(r["path"]).name: [int(r[k]) for k in ("x", "y", "w", "h")] for r in csv.DictReader(f)}
        records = [(Path(r["path"].numpy().decode()).name, r["image"].numpy())
                   for r in tf.data.TFRecordDataset(shards).map(schema.parse)]
        table = tf.constant([by_name[name] for name, _ in records], tf.int32)
        images = tf.constant([data for _, data in records])

        # The whole composite decoded, the box sliced out, then resized as decode_and_resize does.
        ds = tf.data.Dataset.from_tensor_slices((images, table)).map(
            lambda e, b: tf.image.resize(tf.cast(tf.io.decode_image(e, channels=3, expand_animations=False)[
                b[1]:b[1] + b[3], b[0]:b[0] + b[2]], tf.float32), (size, size), antialias=True),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(64).prefetch(tf.data.AUTOTUNE)
    rates = []
    for _ in range(repeats):
        started, n = time.perf_counter(), 0
        for batch in ds:
            n += int(batch.shape[0])
        rates.append(n / (time.perf_counter() - started))
    return statistics.median(rates)


def timing(out: Path, boxes_csv: Path, whole_csv: Path, repeats: int = 3) -> dict:
    """At nice 0: phase 0 of each manifest (--force, alternated, median of `repeats`) — the box-at-read design would
    ingest like `whole` (the composite stored as it is, plus four numbers) — then the decode throughputs."""
    import run as cli

    times = {"crops": [], "whole": []}
    for _ in range(repeats):
        for run, manifest in (("whole", whole_csv), ("crops", boxes_csv)):
            started = time.perf_counter()
            assert cli.main(["phase0", "--force", "--run", run, "--config", str(out / f"{run}.yaml"),
                             "--source", str(manifest)]) == 0
            times[run].append(time.perf_counter() - started)
    return {"load_before": os.getloadavg(),
            "ingest_s": {run: statistics.median(t) for run, t in times.items()},
            "decode_img_s": {"stored_crop": decode_throughput(out / "tfrecords" / "crops", None),
                             "box_at_read": decode_throughput(out / "tfrecords" / "whole", boxes_csv)},
            "disk_bytes": {run: _disk(out / "tfrecords" / run) for run in times},
            "load_after": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(ROOT.parent / "shared/data/clothing10"))
    parser.add_argument("--out", default="/tmp/crops-bench")
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing", action="store_true",
                        help="only the timings (run at nice 0), on the composites and runs an earlier call made")
    args = parser.parse_args()
    out = Path(args.out)
    if args.timing:
        result = timing(out, out / "boxes.csv", out / "whole.csv")
        print(json.dumps(result, indent=2))
        (out / "timing.json").write_text(json.dumps(result, indent=2))
        return
    whole_csv, boxes_csv = make_composites(Path(args.source), out, args.per_class, args.seed)
    t224, t160 = "mobilenet-a0.25-224-imagenet", "mobilenet-a0.25-160-imagenet"
    ensembles = [{"members": [t224, t160], "combine": "concat", "name": "ens-concat"},
                 {"members": [t224, t160], "combine": "mean", "name": "ens-mean"}]
    result = {"load_before": os.getloadavg(), "per_class": args.per_class}
    result["whole"] = run_phases(whole_csv, out, "whole", [224], [])
    result["crops"] = run_phases(boxes_csv, out, "crops", [224, 160], ensembles)
    result["decode_img_s"] = {"stored_crop": decode_throughput(out / "tfrecords" / "crops", None),
                              "box_at_read": decode_throughput(out / "tfrecords" / "whole", boxes_csv)}
    result["load_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    (out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
