"""BENCHMARKS 19: refreshed vs once-mined hard negatives vs plain class-balanced batches, head mode.

For a run whose phase 1 is done (configs/flowers102-distill.yaml, configs/clothing10-hardneg.yaml), trains the
run's first loss on the cached features of its first backbone under three batch recipes x seeds, in a scratch
runs folder (the phase-1 embeddings linked, not copied), with the same epochs and steps for all, and scores each
trained head on the test split (unit/cosine, leave-one-out: phase 4's numbers) plus the refreshes' time.

    nice -n 19 python bench/bench_hard_negative_refresh.py --config configs/clothing10-hardneg.yaml \
        --seeds 0 1 2 --epochs 10 --refresh-every 2 --out /tmp/bench19-clothing.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPES = {
    "random": {"hard_negative_share": 0.0},
    "once": {"hard_negative_share": 0.5},
    "refreshed": {"hard_negative_share": 0.5, "refresh": True},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--refresh-every", type=int, default=2)
    parser.add_argument("--loss", help="the loss to train (default: the config's first)")
    parser.add_argument("--scratch", default="/tmp/bench19")
    parser.add_argument("--out", required=True)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES),
                        help="which batch recipes to train (default: all three)")
    args = parser.parse_args()

    import keras

    from pipeline.config import load_config
    from pipeline.core.artifacts import load_phase1_features
    from pipeline.core.run_dir import RunDir, backbone_tag
    from pipeline.phases.reevaluate import head_embeddings
    from pipeline.phases.train import run_train
    from pipeline.train_config import HardNegativesConfig
    from pipeline.vectors.retrieval import retrieve

    base = load_config(args.config)
    if args.loss:
        base.train.losses = [args.loss]
    source = RunDir(base)
    tag = backbone_tag(base.extract.backbones[0])
    phase1 = load_phase1_features(source.embeddings_dir(tag))
    test = np.flatnonzero(phase1["items"]["split"].to_numpy() == "test")
    labels = phase1["items"]["label"].to_numpy()[test]
    results = []
    for seed in args.seeds:
        for recipe, knobs in ((r, RECIPES[r]) for r in args.recipes):
            name = f"{base.name}-{recipe}-s{seed}"
            runs = Path(args.scratch) / "runs"
            root = runs / name
            shutil.rmtree(root, ignore_errors=True)
            (root / "embeddings").mkdir(parents=True)
            os.symlink(source.embeddings_dir(tag).resolve(), root / "embeddings" / tag)
            if source.dataset_ref.is_file():
                shutil.copy(source.dataset_ref, root / source.dataset_ref.name)
            train = dataclasses.replace(
                base.train, seed=seed, epochs=args.epochs, early_stopping_patience=10 * args.epochs, export=False,
                hard_negative_share=knobs["hard_negative_share"],
                hard_negatives=HardNegativesConfig(source="current", refresh_every=args.refresh_every)
                if knobs.get("refresh") else HardNegativesConfig())
            config = dataclasses.replace(base, name=name, runs_dir=str(runs), extract=dataclasses.replace(
                base.extract, backbones=base.extract.backbones[:1]), train=train)
            started = time.perf_counter()
            (out,) = run_train(config)
            wall = time.perf_counter() - started
            summary = json.loads((out / "training.json").read_text())
            head = keras.saving.load_model(out / "head.keras", compile=False)
            _, unit = head_embeddings(head, phase1["features"][test])
            metrics = retrieve(unit, labels, unit, labels, metric="cosine", k=1, exclude=np.arange(len(test))).metrics
            negatives = summary.get("hard_negatives") or {}
            row = {"recipe": recipe, "seed": seed, "MAP@R": float(metrics["MAP@R"]), "P@1": float(metrics["P@1"]),
                   "train_seconds": wall, "fit_seconds": summary["seconds"],
                   "refresh_seconds": negatives.get("refresh_seconds", 0.0),
                   "n_refreshes": negatives.get("n_refreshes", 0),
                   "changed_share": [r["changed_share"] for r in negatives.get("refreshes", [])],
                   "best_epoch": summary["best_epoch"], "load_average": os.getloadavg()[0]}
            results.append(row)
            print(json.dumps(row), flush=True)
            Path(args.out).write_text(json.dumps({"config": args.config, "loss": base.train.losses[0], "tag": tag,
                                                  "epochs": args.epochs, "refresh_every": args.refresh_every,
                                                  "rows": results}, indent=1))


if __name__ == "__main__":
    main()
