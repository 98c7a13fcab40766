"""The phases, defined once, and running them in order for one configuration; the serving tools.

`PHASES` is the only list of phases: run.py builds its sub-commands from it, and
`run_phases` runs any of them by one loop over it. Each phase says which configuration
sections it reads; once it has succeeded, those sections are saved to the run's
config.yaml, so later commands on the run start from settings that worked, and a
failed command (a bad loss name, an impossible image size, an empty source folder)
changes nothing there.

`TOOLS` are the commands that use a run's results instead of making them (export a bundle, change it,
search it); `check_tool` validates their arguments before TensorFlow loads, `run_tool` runs one.

Importing this module loads no TensorFlow: a phase imports its module when it runs.
"""
from __future__ import annotations

import logging
import time
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from models.backbones import WeightsUnavailableError
from pipeline.config import ConfigError, RunConfig, to_dict, validate_losses
from pipeline.core import atomic
from pipeline.core.errors import ExportError, IngestError, PhaseInputError, TrainingDivergedError
from pipeline.core.run_dir import RunDir

log = logging.getLogger("embedlab")

# What the CLI reports as one line (and a non-zero exit); anything else is a bug and keeps its traceback.
# NotImplementedError: a configured feature that does not exist yet.
PHASE_ERRORS = (IngestError, PhaseInputError, WeightsUnavailableError, FileNotFoundError, ConfigError,
                TrainingDivergedError, ExportError, NotImplementedError)

# The run's identity, saved whenever any phase succeeds.
IDENTITY = ("name", "runs_dir", "reports_dir")


@dataclass(frozen=True)
class Phase:
    name: str
    help: str
    sections: tuple[str, ...]                       # the configuration sections it reads
    run: Callable[[RunConfig, bool, str], None]    # (config, force, the command line for reports)
    # Whether it runs TensorFlow (run.py imports it up front, quietly, only then: phases 2 and 5 read arrays and
    # draw, and importing TensorFlow cost a CIFAR-10 phase 2 about 4 of its 31 s).
    uses_tensorflow: bool = True


def _ingest(config: RunConfig, force: bool, command: str) -> None:
    from pipeline.phases.ingest import run_ingest

    run_ingest(config, force=force)


def _extract(config: RunConfig, force: bool, command: str) -> None:
    from pipeline.phases.extract import run_extract

    run_extract(config, force=force)


def _evaluate(config: RunConfig, force: bool, command: str) -> None:
    from pipeline.phases.evaluate import run_evaluate

    log.info("report: %s", run_evaluate(config, force=force, command=command).resolve())


def _train(config: RunConfig, force: bool, command: str) -> None:
    from pipeline.phases.train import run_train

    run_train(config, force=force)


def _reevaluate(config: RunConfig, force: bool, command: str) -> None:
    from pipeline.phases.reevaluate import run_reevaluate

    run_reevaluate(config, force=force)


def _compare(config: RunConfig, force: bool, command: str) -> None:
    from pipeline.phases.compare import run_compare

    log.info("comparison: %s", run_compare(config, command=command).resolve())


PHASES: dict[str, Phase] = {phase.name: phase for phase in (
    Phase("phase0", "ingest: validate, split and write sharded TFRecords", ("data",), _ingest),
    Phase("phase1", "extract: pretrained-backbone embeddings, JSON + .npy + FAISS index", ("data", "extract"),
          _extract),
    Phase("phase2", "evaluate: retrieval metrics, diagnostics, plots and the HTML report, for every backbone "
                    "of the run (extract.backbones)", ("data", "extract", "evaluate"), _evaluate,
          uses_tensorflow=False),
    Phase("phase3", "train: embedding heads with metric-learning losses (triplet, contrastive, arcface, ...)",
          ("data", "extract", "train"), _train),
    Phase("phase4", "re-evaluate: embeddings of every trained model, evaluated exactly as in phase 2",
          ("data", "extract", "evaluate", "train"), _reevaluate),
    Phase("phase5", "compare: backbones x losses x distances in one report that answers the questions",
          ("extract", "evaluate", "train"), _compare, uses_tensorflow=False),
)}


def check_before_work(config: RunConfig, phases: list[str]) -> None:
    """The phases exist and every setting is valid — all of them, not only the sections these phases
    use: the first phase to succeed saves the run's whole configuration, which later commands read."""
    unknown = [name for name in phases if name not in PHASES]
    if unknown:
        raise ValueError(f"unknown phase(s) {unknown}; known: {list(PHASES)}")
    validate_losses(config)


def run_phases(config: RunConfig, phases: list[str], force: bool = False, command: str = "") -> None:
    check_before_work(config, phases)
    for name in phases:
        phase = PHASES[name]
        started = time.perf_counter()
        phase.run(config, force, command)
        save_settings(config, phase.sections)
        log.info("%s done in %.1f s", name, time.perf_counter() - started)


def save_settings(config: RunConfig, sections: tuple[str, ...]) -> Path:
    """Record in runs/<run>/config.yaml the sections a phase just succeeded with.

    The other sections keep what the file says (they may hold settings no phase has
    used yet); the first phase to succeed on a run writes the whole configuration.
    """
    path = RunDir(config).root / "config.yaml"
    current = to_dict(config)
    saved = None
    if path.is_file():
        try:
            saved = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            log.warning("%s is not valid YAML; writing it anew from this command's settings", path)
    if isinstance(saved, dict):
        merged = {**saved, **{key: current[key] for key in (*IDENTITY, *sections)}}
        # In the order of the sections, as a fresh file would have them.
        current = {key: merged[key] for key in current if key in merged}
    atomic.write_text(path, yaml.safe_dump(current, sort_keys=False))
    return path


# --------------------------------------------------------------------------- serving tools

TOOLS: dict[str, str] = {
    "export": "export a run's best (or a named) model and its whole collection as a search bundle",
    "bundle": "change a bundle: add images (embedded with its own model) or remove ids; a new version each time",
    "search": "search a bundle with an image or a text: a table, JSON, or an HTML grid of thumbnails",
    "infer": "answer a folder or CSV of query images from a bundle into one CSV (query, rank, item, score)",
    "serve": "serve a bundle over HTTP (FastAPI + uvicorn): search API, search page at /, /health, /metrics",
}


def check_tool(args: Namespace, config: RunConfig | None) -> None:
    """Every check of a tool's arguments that needs no TensorFlow; ConfigError (one line) for the first
    that fails."""
    from pipeline.phases.infer import parse_filters
    from pipeline.core.errors import BundleError
    from pipeline.serving.bundle import ITEM_COLUMNS, current_version

    if args.phase == "export":
        if not RunDir(config).root.is_dir():
            raise ConfigError(f"no run {config.name!r} in {config.runs_dir}/: run its phases first")
        return
    try:
        if current_version(args.bundle) is None:
            raise ConfigError(f"no bundle at {args.bundle} (no CURRENT): write one with `python run.py export`")
    except BundleError as exc:
        raise ConfigError(str(exc)) from None
    if getattr(args, "text", None) is not None and \
            not (Path(args.bundle) / "versions" / current_version(args.bundle) / "text_model").is_dir():
        raise ConfigError(f"bundle {args.bundle} has no text model (its backbone embeds no text): search it with "
                          "--image")
    for flag, path in (("--images", getattr(args, "images", None)), ("--queries", getattr(args, "queries", None)),
                       ("--image", getattr(args, "image", None))):
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{flag} {path}: no such file or folder")
    if args.phase == "serve":
        if not 1 <= args.port <= 65535 or args.workers < 1:
            raise ConfigError(f"--port must be 1..65535 and --workers at least 1, got {args.port} and {args.workers}")
        if args.token_file is not None:
            from pipeline.serving.api import read_token_file

            try:
                read_token_file(args.token_file)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    for flag in ("k", "batch_size"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    try:
        unknown = sorted(set(parse_filters(getattr(args, "filter", None))) - set(ITEM_COLUMNS))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if unknown:
        raise ConfigError(f"unknown filter column(s) {unknown}; item columns: {', '.join(ITEM_COLUMNS)}")
    for path in (getattr(args, "html", None), getattr(args, "output", None)):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise ConfigError(f"{path}: its folder does not exist")


def run_tool(args: Namespace, config: RunConfig | None) -> str | None:
    """Run a tool; returns what it prints on standard output (search results), if anything."""
    from pipeline.phases.infer import parse_filters

    filters = parse_filters(getattr(args, "filter", None))
    if args.phase == "export":
        from pipeline.phases.export import run_export

        log.info("bundle: %s", run_export(config, model=args.model, out=args.out, force=args.force).resolve())
    elif args.phase == "bundle" and args.action == "add":
        from pipeline.phases.export import run_bundle_add

        run_bundle_add(args.bundle, args.images)
    elif args.phase == "bundle":
        from pipeline.phases.export import run_bundle_remove

        run_bundle_remove(args.bundle, args.ids)
    elif args.phase == "serve":
        from pipeline.serving.api import Batching, ServeOptions, read_token_file, serve

        token = read_token_file(args.token_file) if args.token_file else None
        serve(args.bundle, host=args.host, port=args.port, workers=args.workers, token=token,
              options=ServeOptions(batching=Batching(enabled=args.micro_batch)))
    elif args.phase == "search":
        from pipeline.phases.infer import run_search

        return run_search(args.bundle, image=args.image, text=args.text, k=args.k, filters=filters,
                          rerank=args.rerank, output="json" if args.json else "table", html_path=args.html)
    else:
        from pipeline.phases.infer import run_infer

        run_infer(args.bundle, args.queries, args.output, k=args.k, batch_size=args.batch_size, filters=filters,
                  rerank=args.rerank)
    return None
