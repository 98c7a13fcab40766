"""Bench 3: quality on real data — Flowers-102, class-disjoint (train 001–051, test 052–102).

MobileNet 0.25 at 224 px with real ImageNet weights (KERAS_HOME=../shared/keras) vs
the same network with random weights; phase-2 metric table, cosine and euclidean,
leave-one-out over the unseen test classes.

    KERAS_HOME=../shared/keras python bench/bench_flowers.py
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_flowers_"))
    common = ["--config", str(REPO / "configs/flowers102.yaml"),
              "--source", str(REPO.parent / "shared/data/flowers102"),
              "--set", f"runs_dir={work}/runs", "--set", f"reports_dir={work}/reports",
              "--set", f"data.tfrecords_dir={work}/tfrecords", "--set", "evaluate.projections=pca,tsne"]
    for weights in ("imagenet", "none"):
        cmd = [sys.executable, str(REPO / "run.py"), "all", *common, "--run", f"flowers-{weights}",
               "--weights", weights, "--image-size", str(args.size)]
        print("running:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=os.environ.copy())
    print("\n| weights | variant | P@1 | P@5 | R@5 | mAP | MAP@R | R-precision | NMI |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for weights in ("imagenet", "none"):
        m = json.loads(next((work / f"runs/flowers-{weights}/eval").glob("*/metrics.json")).read_text())
        for variant, r in m["retrieval"].items():
            nmi = m["clustering"].get(variant.split("/")[0], {}).get("NMI", float("nan"))
            print(f"| {weights} | {variant} | {r['P@1']:.3f} | {r['P@k']:.3f} | {r['R@k']:.3f} | {r['mAP']:.3f} "
                  f"| {r['MAP@R']:.3f} | {r['R-precision']:.3f} | {nmi:.3f} |")
    print("protocol:", m["protocol"])
    print("reports:", work / "reports")


if __name__ == "__main__":
    main()
