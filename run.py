#!/usr/bin/env python
"""embedlab command line: one sub-command per phase.

    python run.py phase0 --config configs/demo.yaml
    python run.py all --source path/to/images --backbone resnet50 --backbone mobilenet
    python run.py phase2 --run myrun --set evaluate.k=10
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported anywhere

PHASES = {
    "phase0": "ingest: validate, split and write sharded TFRecords",
    "phase1": "extract: pretrained-backbone embeddings, JSON + .npy + FAISS index",
    "phase2": "evaluate: retrieval metrics, diagnostics, plots and the HTML report",
    "phase3": "train: embedding heads with metric-learning losses (triplet, contrastive, arcface, ...)",
    "phase4": "re-evaluate: embeddings of every trained model, evaluated exactly as in phase 2",
    "phase5": "compare: backbones x losses x distances in one report that answers the questions",
    "all": "phases 0 to 5 in order",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.py", description="embedlab: image embeddings, measured.")
    sub = parser.add_subparsers(dest="phase", required=True, metavar="PHASE")
    for name, help_text in PHASES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="YAML configuration (see configs/); defaults apply without one")
        p.add_argument("--run", help="run name: artifacts go to runs/<run>/ and reports/<run>/")
        p.add_argument("--force", action="store_true", help="redo work even when its outputs are up to date")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override any setting, e.g. --set evaluate.k=10 (repeatable)")
        p.add_argument("-v", "--verbose", action="store_true")
        if name in ("phase0", "all"):
            g = p.add_argument_group("phase 0")
            g.add_argument("--source", help="image folder, CSV/Parquet manifest, or fashion_mnist / cifar10")
            g.add_argument("--split", choices=["stratified", "classes"])
            g.add_argument("--ratios", help="train,val,test fractions, e.g. 0.7,0.15,0.15")
            g.add_argument("--seed", type=int)
            g.add_argument("--max-side", type=int, help="downscale images whose longest side exceeds this")
            g.add_argument("--limit-per-class", type=int)
        if name in ("phase1", "all"):
            g = p.add_argument_group("phase 1")
            g.add_argument("--backbone", action="append", metavar="NAME",
                           help="backbone from the registry (repeatable): resnet50, efficientnetb0..b7, mobilenet")
            g.add_argument("--weights", help="imagenet | none | path to a weights file")
            g.add_argument("--image-size", type=int, help="input side in pixels (default: native)")
            g.add_argument("--alpha", type=float, help="MobileNet width multiplier")
            g.add_argument("--batch-size", type=int)
        if name in ("phase1", "phase3", "all"):
            p.add_argument("--mixed-precision", action="store_true",
                           help="mixed_float16 for extraction (phase 1) and training (phase 3); for GPUs")
        if name in ("phase3", "phase4", "phase5", "all"):
            g = p.add_argument_group("phases 3-5")
            g.add_argument("--loss", action="append", metavar="NAME",
                           help="loss to train (repeatable): triplet, contrastive, contrastive_softmax, arcface, "
                                "multisimilarity, supcon, infonce")
        if name in ("phase3", "all"):
            g.add_argument("--mode", choices=["head", "finetune"], help="head: frozen backbone, cached features")
            g.add_argument("--epochs", type=int)
            g.add_argument("--positives", choices=["label", "group"],
                           help="positive pairs share a class label, or a group (an original and its variants)")
            g.add_argument("--hard-negatives", type=float, metavar="SHARE",
                           help="share of each batch's classes seeded with the baseline's hardest negatives (0-1)")
        if name in ("phase2", "all"):
            g = p.add_argument_group("phase 2")
            g.add_argument("--k", type=int, help="neighbours per query (default 5)")
            g.add_argument("--gallery", help="gallery splits, e.g. test or train,val,test")
    return parser


def saved_run_config(args) -> str | None:
    """An existing run's own config.yaml, so `phase1 --run NAME` needs no paths re-passed."""
    from pathlib import Path

    if not args.run:
        return None
    runs_dir = "runs"
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key.strip() == "runs_dir":
            runs_dir = value.strip()
    path = Path(runs_dir) / args.run / "config.yaml"
    if path.is_file():
        print(f"using the settings of run {args.run!r} ({path})", file=sys.stderr)
        return str(path)
    return None


def config_from_args(args):
    from models.backbones import BACKBONES
    from pipeline.config import BackboneConfig, load_config

    overrides = []
    if args.run:
        overrides.append(f"name={args.run}")
    flag_settings = {
        "source": "data.source", "split": "data.split", "ratios": "data.ratios", "seed": "data.seed",
        "max_side": "data.max_side", "limit_per_class": "data.limit_per_class",
        "batch_size": "extract.batch_size", "k": "evaluate.k", "gallery": "evaluate.gallery_splits",
        "mode": "train.mode", "epochs": "train.epochs", "positives": "train.positives",
        "hard_negatives": "train.hard_negative_share",
    }
    for attr, key in flag_settings.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if getattr(args, "loss", None):
        overrides.append(f"train.losses={','.join(args.loss)}")
    if getattr(args, "mixed_precision", False):
        if args.phase in ("phase1", "all"):
            overrides.append("extract.mixed_precision=true")
        if args.phase in ("phase3", "all"):
            overrides.append("train.mixed_precision=true")
    config_path = args.config or saved_run_config(args)
    config = load_config(config_path, overrides + args.overrides)

    names = getattr(args, "backbone", None)
    if names:
        unknown = [n for n in names if n not in BACKBONES]
        if unknown:
            raise SystemExit(f"error: unknown backbone(s) {unknown}; known: {', '.join(sorted(BACKBONES))}")
        template = config.extract.backbones[0]
        chosen = []
        for n in names:
            # A backbone the configuration already describes keeps its settings (a saved run's
            # image size, alpha, weights); a new one starts from the first's weights.
            known = [b for b in config.extract.backbones if b.name == n]
            chosen += known or [BackboneConfig(name=n, weights=template.weights,
                                               weights_fallback=template.weights_fallback,
                                               alpha=template.alpha if n == "mobilenet" else 1.0)]
        config.extract.backbones = chosen
    for backbone in config.extract.backbones:
        if getattr(args, "weights", None) is not None:
            backbone.weights = args.weights
            backbone.weights_fallback = "error"  # asked for explicitly: missing weights must stop the run
        if getattr(args, "image_size", None) is not None:
            backbone.image_size = args.image_size
        if getattr(args, "alpha", None) is not None and backbone.name == "mobilenet":
            backbone.alpha = args.alpha
    return config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.config import ConfigError
    from pipeline.core.logging_setup import setup_logging

    setup_logging(verbose=args.verbose)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from pipeline.runner import PHASE_ERRORS, run_phases

    phases = [f"phase{i}" for i in range(6)] if args.phase == "all" else [args.phase]
    try:
        run_phases(config, phases, force=args.force, command=" ".join(["python run.py", *sys.argv[1:]]))
    except PHASE_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
