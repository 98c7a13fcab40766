"""The phases, defined once, and running them in order for one configuration.

`PHASES` is the only list of phases: run.py builds its sub-commands from it, and
`run_phases` runs any of them by one loop over it. Each phase says which configuration
sections it reads; once it has succeeded, those sections are saved to the run's
config.yaml, so later commands on the run start from settings that worked, and a
failed command (a bad loss name, an impossible image size, an empty source folder)
changes nothing there.

Importing this module loads no TensorFlow: a phase imports its module when it runs.
"""
from __future__ import annotations

import logging
import time
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
                    "of the run (extract.backbones)", ("data", "extract", "evaluate"), _evaluate),
    Phase("phase3", "train: embedding heads with metric-learning losses (triplet, contrastive, arcface, ...)",
          ("data", "extract", "train"), _train),
    Phase("phase4", "re-evaluate: embeddings of every trained model, evaluated exactly as in phase 2",
          ("data", "extract", "evaluate", "train"), _reevaluate),
    Phase("phase5", "compare: backbones x losses x distances in one report that answers the questions",
          ("extract", "evaluate", "train"), _compare),
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
