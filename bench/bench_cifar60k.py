"""Bench 2: the 60,000-image case end to end — CIFAR-10 through phases 0, 1 and 2.

Extracts ../shared/data/cifar10.tar.gz (60,000 32×32 JPEGs) to a temporary folder,
then runs each phase as its own process under bench/measure.py (wall time and peak
RSS of the whole process tree). Phase 2 searches the 9,000 test queries against the
whole 60,000-image collection (gallery = train+val+test, leave-one-out), the
realistic "find similar images in my collection" protocol.

    KERAS_HOME=../shared/keras python bench/bench_cifar60k.py [--size 96]

Phase 2 alone, before vs after (issue 13): `--phase2-only --work W` re-runs phase 2 (`--force`) on the
embeddings an earlier full run left in W, alternating between code trees, each run a fresh process measured
the same way, and prints each run's wall, peak RSS, load average and phase-2 timings, then the medians:

    python bench/bench_cifar60k.py --phase2-only --work /tmp/cifar --repeat 3 \
        --tree before=/tmp/old-checkout --tree after=. --tree after-beside=.:beside

A tree is NAME=PATH (a checkout whose run.py is used) with an optional `:beside`, which starts t-SNE/UMAP
before retrieval instead of after it (`pipeline.phases.evaluate.PROJECTIONS_BESIDE_RETRIEVAL`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
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
    parser.add_argument("--phase2-only", action="store_true", help="time phase 2 alone on an earlier run's work")
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=PATH[:beside]")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tree (--phase2-only), alternating")
    args = parser.parse_args()
    if args.phase2_only:
        if not args.work:
            parser.error("--phase2-only needs --work (the folder of an earlier full run)")
        return phase2_only(Path(args.work), args)

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


def phase2_command(tree: Path, beside: bool, common: list[str], size: int, gallery: str) -> list[str]:
    args = ["phase2", *common, "--force", "--set", "data.name=cifar10", "--set", "extract.backbones.0.name=mobilenet",
            "--set", "extract.backbones.0.alpha=0.25", "--set", f"extract.backbones.0.image_size={size}",
            "--set", f"evaluate.gallery_splits={gallery}"]
    run_py = str(tree / "run.py")
    if not beside:
        return [sys.executable, run_py, *args]
    # The same code with projections started before retrieval (the order phase 2 used before issue 13).
    code = (f"import sys; sys.path.insert(0, {str(tree)!r}); sys.argv = [{run_py!r}, *{args!r}]; "
            "import pipeline.phases.evaluate as e; e.PROJECTIONS_BESIDE_RETRIEVAL = True; "
            f"import runpy; runpy.run_path({run_py!r}, run_name='__main__')")
    return [sys.executable, "-c", code]


def phase2_only(work: Path, args: argparse.Namespace) -> None:
    trees = []
    for spec in args.tree or ["after=."]:
        name, _, path = spec.partition("=")
        path, _, option = path.partition(":")
        trees.append((name, Path(path).resolve(), option == "beside"))
    common = ["--run", "cifar60k", "--set", f"runs_dir={work}/runs", "--set", f"reports_dir={work}/reports",
              "--set", f"data.tfrecords_dir={work}/tfrecords"]
    metrics_path = next((work / "runs/cifar60k/eval").glob("*/metrics.json"))
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in trees}
    for repeat in range(args.repeat):
        for name, tree, beside in trees:
            # The settings a run recorded are those of the code that wrote them; another tree may not know them
            # all, so every run reads only its own command line.
            (work / "runs/cifar60k/config.yaml").unlink(missing_ok=True)
            load_before = os.getloadavg()
            # /usr/bin/time adds the CPU seconds of the phase and its projection process: on a shared machine the
            # work itself, where wall time depends on the other jobs.
            cpu_file = work / "phase2_cpu.txt"
            command = ["/usr/bin/time", "-f", "%U %S", "-o", str(cpu_file),
                       *phase2_command(tree, beside, common, args.size, args.gallery)]
            result = measure(command, env=os.environ.copy())
            if result["returncode"] != 0:
                raise SystemExit(f"{name} failed with exit code {result['returncode']}")
            metrics = json.loads(metrics_path.read_text())
            row = {"wall_s": result["wall_s"], "peak_rss_mb": result["peak_rss_mb"],
                   "cpu_s": sum(float(v) for v in cpu_file.read_text().split()[-2:]),
                   "load": (load_before[0], os.getloadavg()[0]),
                   "timings": {k: round(v, 1) for k, v in metrics["timings_s"].items()},
                   "P@1": metrics["retrieval"]["unit/cosine"]["P@1"], "mAP": metrics["retrieval"]["unit/cosine"]["mAP"]}
            runs[name].append(row)
            print(f"run {repeat + 1} {name}: {row['wall_s']:.1f} s ({row['cpu_s']:.0f} CPU s), "
                  f"peak RSS {row['peak_rss_mb']:.0f} MB, load {row['load'][0]:.1f} -> {row['load'][1]:.1f}, "
                  f"timings {row['timings']}, P@1 {row['P@1']:.4f} mAP {row['mAP']:.4f}", flush=True)
    print("\n| code | runs: wall (s) | median wall (s) | median CPU (s) | median peak RSS (MB) "
          "| load average (1 min) |")
    print("|---|---|---:|---:|---:|---|")
    for name, rows in runs.items():
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in rows)
        loads = f"{min(r['load'][0] for r in rows):.1f}–{max(r['load'][1] for r in rows):.1f}"
        print(f"| {name} | {walls} | {statistics.median(r['wall_s'] for r in rows):.1f} "
              f"| {statistics.median(r['cpu_s'] for r in rows):.0f} "
              f"| {statistics.median(r['peak_rss_mb'] for r in rows):.0f} | {loads} |")


if __name__ == "__main__":
    main()
