"""Run phases in order for one configuration; the CLI's only entry point into the pipeline."""
from __future__ import annotations

import logging
import time

import yaml

from pipeline.core import atomic
from pipeline.config import RunConfig, to_dict
from pipeline.core.errors import PhaseInputError
from pipeline.core.run_dir import RunDir

log = logging.getLogger("embedlab")


def _phase_errors() -> tuple[type[BaseException], ...]:
    from models.backbones import WeightsUnavailableError

    from pipeline.config import ConfigError
    from pipeline.core.errors import IngestError
    from pipeline.core.errors import ExportError
    from pipeline.core.errors import TrainingDivergedError

    # NotImplementedError: a configured feature that does not exist yet.
    return (IngestError, PhaseInputError, WeightsUnavailableError, FileNotFoundError, ConfigError,
            TrainingDivergedError, ExportError, NotImplementedError)




PHASE_ERRORS = _phase_errors()


def run_phases(config: RunConfig, phases: list[str], force: bool = False, command: str = "") -> None:
    run_dir = RunDir(config)
    run_dir.root.mkdir(parents=True, exist_ok=True)
    atomic.write_text(run_dir.root / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
    for phase in phases:
        started = time.perf_counter()
        if phase == "phase0":
            from pipeline.phases.ingest import run_ingest
            run_ingest(config, force=force)
        elif phase == "phase1":
            from pipeline.phases.extract import run_extract
            run_extract(config, force=force)
        elif phase == "phase2":
            from pipeline.phases.evaluate import run_evaluate
            report = run_evaluate(config, force=force, command=command)
            log.info("report: %s", report.resolve())
        elif phase == "phase3":
            from pipeline.training.head import run_train
            run_train(config, force=force)
        elif phase == "phase4":
            from pipeline.phases.reevaluate import run_reevaluate
            run_reevaluate(config, force=force)
        elif phase == "phase5":
            from pipeline.phases.compare import run_compare
            log.info("comparison: %s", run_compare(config, command=command).resolve())
        else:
            raise ValueError(f"unknown phase {phase!r}")
        log.info("%s done in %.1f s", phase, time.perf_counter() - started)
