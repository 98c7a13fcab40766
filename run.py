#!/usr/bin/env python
"""embedlab command line: one sub-command per phase (pipeline.runner.PHASES), plus `all`.

    python run.py phase0 --config configs/demo.yaml
    python run.py all --source path/to/images --backbone resnet50 --backbone efficientnetb0
    python run.py phase2 --run myrun --set evaluate.k=10
    python run.py export --run myrun && python run.py search --bundle runs/myrun/bundle --image q.jpg

Arguments and settings are read and checked before TensorFlow is imported, so a mistake
costs a fraction of a second, and a command that fails saves none of its settings.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.core.logging_setup import quiet_tensorflow_environment

quiet_tensorflow_environment()  # before TensorFlow is imported anywhere

# Which phases' sub-commands (and `all`) offer each group of flags.
PHASE0, PHASE1, PHASE2 = ("phase0",), ("phase1",), ("phase2",)
TRAINING, LOSSES, MIXED_PRECISION = ("phase3",), ("phase3", "phase4", "phase5"), ("phase1", "phase3")


def offers(command: str, phases: tuple[str, ...]) -> bool:
    """Whether a sub-command takes the flags of these phases (`all` takes every phase's)."""
    return command in phases or command == "all"


def build_parser() -> argparse.ArgumentParser:
    from models.backbones import BACKBONES, parameter_help
    from pipeline.runner import PHASES

    parser = argparse.ArgumentParser(prog="run.py", description="embedlab: image embeddings, measured.")
    sub = parser.add_subparsers(dest="phase", required=True, metavar="PHASE")
    commands = {name: phase.help for name, phase in PHASES.items()}
    commands["all"] = f"{', '.join(PHASES)} in order"
    for name, help_text in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="YAML configuration (see configs/); defaults apply without one")
        p.add_argument("--run", help="run name: artifacts go to runs/<run>/ and reports/<run>/; without --config, "
                                     "the run's saved settings (runs/<run>/config.yaml) apply")
        p.add_argument("--force", action="store_true", help="redo work even when its outputs are up to date")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override any setting, e.g. --set evaluate.k=10 (repeatable)")
        p.add_argument("-v", "--verbose", action="store_true", help="log debug lines too (and Python warnings)")
        if offers(name, PHASE0):
            g = p.add_argument_group("phase 0")
            g.add_argument("--source", help="image folder, CSV/Parquet manifest, or fashion_mnist / cifar10")
            g.add_argument("--split", choices=["stratified", "classes"],
                           help="stratified: every class in every split (default); classes: class-disjoint "
                                "splits, so test classes are unseen in training")
            g.add_argument("--ratios", help="train,val,test fractions, e.g. 0.7,0.15,0.15")
            g.add_argument("--seed", type=int, help="seed of the split and of --limit-per-class's sample (default 42)")
            g.add_argument("--max-side", type=int, help="downscale images whose longest side exceeds this")
            g.add_argument("--limit-per-class", type=int, metavar="N",
                           help="keep at most N images per class, a seeded sample (default 0: all)")
        if offers(name, PHASE1):
            g = p.add_argument_group("phase 1")
            g.add_argument("--backbone", action="append", metavar="NAME",
                           help=f"backbone from the registry (repeatable): {', '.join(sorted(BACKBONES))}")
            g.add_argument("--weights", help="imagenet | none (random, seeded) | path to a weights file")
            g.add_argument("--image-size", type=int,
                           help="input side in pixels (default: the backbone's native size; at least 32)")
            g.add_argument("--backbone-param", action="append", default=[], metavar="KEY=VALUE",
                           help="an option of the backbones that take it (repeatable)")
            for key, param_help in parameter_help().items():
                g.add_argument(f"--{key.replace('_', '-')}", dest=f"backbone_param_{key}", metavar="VALUE",
                               help=f"{param_help}; short for --backbone-param {key}=VALUE")
            g.add_argument("--batch-size", type=int, help="images per inference batch (default 64)")
        if offers(name, MIXED_PRECISION):
            p.add_argument("--mixed-precision", action="store_true",
                           help="mixed_float16 for extraction (phase 1) and training (phase 3); for GPUs")
        if offers(name, LOSSES):
            g = p.add_argument_group("phases 3-5")
            g.add_argument("--loss", action="append", metavar="NAME",
                           help="loss to train (repeatable): triplet, contrastive, contrastive_softmax, arcface, "
                                "multisimilarity, supcon, infonce")
            # Phases 4 and 5 take the mode too: it says which trained models they evaluate and compare.
            g.add_argument("--mode", choices=["head", "finetune", "distill"],
                           help="head: frozen backbone, cached features; finetune: trunk + head on images; distill: "
                                "students learn --teacher's embedding space (phases 4-5: the models of that mode)")
            g.add_argument("--teacher", metavar="TAG",
                           help="distill: the teacher, a model of the run (e.g. mobilenet-a0.25-224-imagenet+arcface), "
                                "RUN/TAG, or a folder with embedding_model.keras")
            g.add_argument("--student", metavar="BACKBONE",
                           help="distill: the student backbone (its tag or name among the run's backbones; default: "
                                "all but the teacher's)")
        if offers(name, TRAINING):
            g.add_argument("--epochs", type=int, help="maximum training epochs (early stopping may end sooner)")
            g.add_argument("--positives", choices=["label", "group"],
                           help="positive pairs share a class label, or a group (an original and its variants)")
            g.add_argument("--hard-negatives", type=float, metavar="SHARE",
                           help="share of each batch's classes seeded with the baseline's hardest negatives (0-1)")
        if offers(name, PHASE2):
            g = p.add_argument_group("phase 2")
            g.add_argument("--k", type=int, help="neighbours per query (default 5)")
            g.add_argument("--gallery", help="gallery splits, e.g. test or train,val,test")
    add_tool_parsers(sub)
    from pipeline.phases.similarity import add_arguments as add_similarity_parser

    add_similarity_parser(sub)
    return parser


def add_tool_parsers(sub) -> None:
    """The serving tools (pipeline.runner.TOOLS): export a bundle, change it, search it."""
    from pipeline.runner import TOOLS

    p = sub.add_parser("export", help=TOOLS["export"], description=TOOLS["export"])
    p.add_argument("--run", required=True, help="the run whose model and collection to export")
    p.add_argument("--model", default="best",
                   help="best (highest test MAP@R among the run's phase-2/4 evaluations, default), an embeddings "
                        "tag, or BACKBONE[+LOSS], e.g. mobilenet+triplet")
    p.add_argument("--out", help="bundle folder (default runs/<run>/bundle)")
    p.add_argument("--config", help="YAML configuration, when the run's own config.yaml is not the one to use")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set runs_dir=/data/runs (repeatable)")
    p.add_argument("--force", action="store_true", help="write a new version even when the bundle holds this export")

    p = sub.add_parser("bundle", help=TOOLS["bundle"], description=TOOLS["bundle"])
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="embed images with the bundle's own model and add them")
    add.add_argument("--images", required=True, metavar="DIR|CSV",
                     help="a folder (a first-level sub-folder names the label) or a CSV/Parquet with path and "
                          "optional id, label, text, group, split columns")
    remove = actions.add_parser("remove", help="remove items by id (nothing is re-embedded)")
    remove.add_argument("--ids", required=True, nargs="+", metavar="ID", help="ids of the items to remove")
    tool_parsers = [add, remove]

    p = sub.add_parser("search", help=TOOLS["search"], description=TOOLS["search"])
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", help="query image file")
    query.add_argument("--text", help="query text (bundles of CLIP backbones)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML grid of the results' thumbnails")
    tool_parsers.append(p)

    p = sub.add_parser("infer", help=TOOLS["infer"], description=TOOLS["infer"])
    p.add_argument("--queries", required=True, metavar="DIR|CSV", help="a folder of query images, or a CSV/Parquet "
                                                                       "with a path column (and optional id)")
    p.add_argument("--output", required=True, metavar="CSV",
                   help="results: query_id, rank, item_id, score, label, label_name (skipped files: "
                        "<output>.rejects.csv)")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    tool_parsers.append(p)

    p = sub.add_parser("serve", help=TOOLS["serve"], description=TOOLS["serve"])
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes, each loading the model and index once (default 1)")
    p.add_argument("--token-file", metavar="FILE",
                   help="file holding a bearer token (first line, 16+ characters); enables POST /items and "
                        "DELETE /items/{id}")
    p.add_argument("--micro-batch", action="store_true",
                   help="batch concurrent image requests onto one model call (off by default: see BENCHMARKS.md)")
    tool_parsers.append(p)

    for p in tool_parsers:
        p.add_argument("--bundle", required=True, help="bundle folder (holds CURRENT)")
        if p.prog.split()[-1] in ("search", "infer"):
            p.add_argument("--k", type=int, default=10, help="results per query (default 10)")
            p.add_argument("--filter", action="append", default=[], metavar="COLUMN=VALUE",
                           help="keep items whose column equals the value, e.g. label_name=shoes (repeatable)")
            p.add_argument("--rerank", choices=["category", "boost"],
                           help="category: the query's predicted category (label vote of its 10 nearest items) "
                                "first; boost: +0.1 to their scores")
    for p in [*tool_parsers, sub.choices["export"]]:
        p.add_argument("-v", "--verbose", action="store_true", help="log debug lines too (and Python warnings)")


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
    from pipeline.config import ConfigError, load_config

    overrides = []
    if args.run:
        overrides.append(f"name={args.run}")
    flag_settings = {
        "source": "data.source", "split": "data.split", "ratios": "data.ratios", "seed": "data.seed",
        "max_side": "data.max_side", "limit_per_class": "data.limit_per_class",
        "batch_size": "extract.batch_size", "k": "evaluate.k", "gallery": "evaluate.gallery_splits",
        "mode": "train.mode", "epochs": "train.epochs", "positives": "train.positives",
        "hard_negatives": "train.hard_negative_share", "teacher": "train.teacher", "student": "train.student",
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
    saved = None if args.config else saved_run_config(args)
    try:
        config = load_config(args.config or saved, overrides + args.overrides)
        choose_backbones(config, args)
    except ConfigError as exc:
        if saved:
            raise ConfigError(f"{exc} (with the saved settings of run {args.run!r}, {saved})") from None
        raise
    return config


def choose_backbones(config, args) -> None:
    """Apply --backbone, --weights, --image-size and the backbone options to `config`, then check it again."""
    from models.backbones import BACKBONES, get_spec, parameter_help
    from pipeline.config import BackboneConfig, ConfigError, validate
    from pipeline.config_io import parse_value

    names = getattr(args, "backbone", None)
    if names:
        unknown = [n for n in names if n not in BACKBONES]
        if unknown:
            raise ConfigError(f"unknown backbone(s) {unknown}; known: {', '.join(sorted(BACKBONES))}")
        template = config.extract.backbones[0]
        chosen = []
        for n in names:
            # A backbone the configuration already describes keeps its settings (a saved run's
            # image size, options, weights); a new one starts from the first's weights, and its
            # options where it takes the same ones.
            known = [b for b in config.extract.backbones if b.name == n]
            options = {k: v for k, v in template.params.items() if k in get_spec(n).params}
            chosen += known or [BackboneConfig(name=n, weights=template.weights, params=options,
                                               weights_fallback=template.weights_fallback,
                                               init_seed=template.init_seed)]
        config.extract.backbones = chosen

    options = {}
    for item in getattr(args, "backbone_param", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--backbone-param {item!r} is not of the form KEY=VALUE")
        options[key.strip()] = value
    for key in parameter_help():
        value = getattr(args, f"backbone_param_{key}", None)
        if value is not None:
            options[key] = value
    for key, value in options.items():
        takers = [b for b in config.extract.backbones if key in get_spec(b.name).params]
        if not takers:
            names = ", ".join(b.name for b in config.extract.backbones)
            raise ConfigError(f"backbone option {key!r}: none of the backbones ({names}) takes it")
        for backbone in takers:
            backbone.params = {**backbone.params, key: parse_value(value, f"--backbone-param {key}")}
    for backbone in config.extract.backbones:
        if getattr(args, "weights", None) is not None:
            backbone.weights = args.weights
            backbone.weights_fallback = "error"  # asked for explicitly: missing weights must stop the run
        if getattr(args, "image_size", None) is not None:
            backbone.image_size = args.image_size
    validate(config)


def main_tool(args) -> int:
    """A serving tool: arguments checked before TensorFlow loads, errors in one line."""
    from pipeline.config import ConfigError, load_config
    from pipeline.core.logging_setup import import_tensorflow_quietly, setup_logging
    from pipeline.runner import PHASE_ERRORS, check_tool, run_tool

    setup_logging(verbose=args.verbose)
    config = None
    try:
        if args.phase == "export":
            saved = None if args.config else saved_run_config(args)
            config = load_config(args.config or saved, [f"name={args.run}", *args.overrides])
        check_tool(args, config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import_tensorflow_quietly()
    try:
        printed = run_tool(args, config)
    except PHASE_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: a bundle is only ever replaced whole; nothing half-written is in use", file=sys.stderr)
        return 130
    if printed is not None:
        print(printed)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.runner import TOOLS

    if args.phase in TOOLS:
        return main_tool(args)
    if args.phase == "similarity":
        from pipeline.phases.similarity import main as similarity_main

        return similarity_main(args)
    from pipeline.config import ConfigError
    from pipeline.core.logging_setup import import_tensorflow_quietly, setup_logging
    from pipeline.runner import PHASE_ERRORS, PHASES, check_before_work, run_phases

    setup_logging(verbose=args.verbose)
    phases = list(PHASES) if args.phase == "all" else [args.phase]
    try:
        config = config_from_args(args)
        check_before_work(config, phases)   # every check that needs no TensorFlow, before it loads
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if any(PHASES[name].uses_tensorflow for name in phases):
        import_tensorflow_quietly()
    try:
        run_phases(config, phases, force=args.force, command=" ".join(["python run.py", *sys.argv[1:]]))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PHASE_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
