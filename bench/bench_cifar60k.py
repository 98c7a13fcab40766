"""Bench 2: the 60,000-image case end to end — CIFAR-10 through phases 0, 1 and 2.

Extracts ../shared/data/cifar10.tar.gz (60,000 32×32 JPEGs) to a temporary folder,
then runs each phase as its own process under bench/measure.py (wall time and peak
RSS of the whole process tree). Phase 2 searches the 9,000 test queries against the
whole 60,000-image collection (gallery = train+val+test, leave-one-out), the
realistic "find similar images in my collection" protocol.

    KERAS_HOME=../shared/keras python bench/bench_cifar60k.py [--size 96]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.measure import measure  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tar", default=str(REPO.parent / "shared/data/cifar10.tar.gz"))
    parser.add_argument("--size", type=int, default=96, help="MobileNet input side")
    parser.add_argument("--work", default="", help="working folder (default: a new temporary one)")
    parser.add_argument("--gallery", default="train,val,test")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_cifar_"))
    images = work / "cifar10"
    if not images.is_dir():
        print(f"extracting {args.tar} → {work}")
        with tarfile.open(args.tar) as tar:
            tar.extractall(work, filter="data")
    common = ["--run", "cifar60k", "--set", f"runs_dir={work}/runs", "--set", f"reports_dir={work}/reports",
              "--set", f"data.tfrecords_dir={work}/tfrecords"]
    python = sys.executable
    steps = [
        ("phase0", [python, str(REPO / "run.py"), "phase0", *common, "--source", str(images),
                    "--set", "data.label_from=parent", "--set", "data.name=cifar10"]),
        ("phase1", [python, str(REPO / "run.py"), "phase1", *common, "--set", "data.name=cifar10",
                    "--backbone", "mobilenet", "--alpha", "0.25", "--image-size", str(args.size),
                    "--weights", "imagenet", "--batch-size", "256", "--set", "extract.write_json=true"]),
        ("phase2", [python, str(REPO / "run.py"), "phase2", *common, "--set", "data.name=cifar10",
                    "--set", "extract.backbones.0.name=mobilenet", "--set", "extract.backbones.0.alpha=0.25",
                    "--set", f"extract.backbones.0.image_size={args.size}",
                    "--set", f"evaluate.gallery_splits={args.gallery}"]),
    ]
    rows = []
    for label, cmd in steps:
        print("running", label, flush=True)
        result = measure(cmd, env=os.environ.copy())
        rows.append((label, result))
        if result["returncode"] != 0:
            raise SystemExit(f"{label} failed with exit code {result['returncode']}")
    metrics = json.loads(next((work / "runs/cifar60k/eval").glob("*/metrics.json")).read_text())
    print("\n| phase | wall (s) | peak RSS (MB) |\n|---|---:|---:|")
    for label, r in rows:
        print(f"| {label} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    print("\nphase-2 timings (s):", {k: round(v, 1) for k, v in metrics["timings_s"].items()})
    print("protocol:", metrics["protocol"])
    for variant, m in metrics["retrieval"].items():
        print(f"{variant}: P@1 {m['P@1']:.3f} MAP@R {m['MAP@R']:.3f} mAP {m['mAP']:.3f}")
    print("work folder:", work)


if __name__ == "__main__":
    main()
