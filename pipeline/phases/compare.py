"""Phase 5: one report that compares backbones × losses × distances and answers the
user's questions (which backbone, which loss, cosine or euclidean, less anisotropy,
better neighbours) from the numbers of phases 2 and 4.

Writes `reports/<run>/comparison.html`, `comparison.csv` and `comparison.json`. This module
collects and checks the evaluations; the table, the answers and the page are built in
pipeline/reporting/compare_view.py.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.core import atomic
from pipeline.core.artifacts import evaluation_fingerprint, trained_embeddings_match, trained_tag
from pipeline.core.errors import PhaseInputError
from pipeline.core.run_dir import RunDir
from pipeline.phases.ensemble import ensemble_entries
from pipeline.reporting.compare_view import PRETRAINED

log = logging.getLogger("embedlab.compare")


def collect(config: RunConfig) -> list[dict]:
    """One entry per (backbone, loss) model with its phase-2/4 metrics and, for trained models, its
    training.json; pretrained first, ensembles last."""
    run_dir = RunDir(config)
    models = []
    from pipeline.training.distill_plan import compared_model_groups

    # Under train.mode distill: every backbone's pretrained model, the teacher and the distilled students.
    for tag, losses in compared_model_groups(config, PRETRAINED):
        for loss in losses:
            eval_tag = tag if loss == PRETRAINED else trained_tag(tag, loss)
            path = run_dir.eval_dir(eval_tag) / "metrics.json"
            if not path.is_file():
                phase = "phase2" if loss == PRETRAINED else "phase4"
                raise PhaseInputError(
                    f"no evaluation of {eval_tag} ({path} missing): run `python run.py {phase}` first")
            metrics = atomic.read_json(path)
            training = _check_current(run_dir, config, tag, loss, eval_tag, metrics)
            models.append({"backbone": tag, "loss": loss, "eval_tag": eval_tag, "eval_dir": path.parent,
                           "metrics": metrics, "training": training})
    # evaluate.ensembles: one more entry each (loss "ensemble"), checked to be of its members as they are now.
    return models + ensemble_entries(run_dir, config)


def _check_current(run_dir: RunDir, config: RunConfig, tag: str, loss: str, eval_tag: str,
                   metrics: dict) -> dict | None:
    """The evaluation must be of the embeddings on disk, and those of the model phase 3 trained last.

    Otherwise the report would put one model's training details beside another's scores. Returns the
    trained model's training.json (None for pretrained models).
    """
    phase = "phase2" if loss == PRETRAINED else "phase4"
    emb_meta_path = run_dir.embeddings_dir(eval_tag) / "meta.json"
    emb_meta = atomic.read_json(emb_meta_path) if emb_meta_path.is_file() else {}
    if metrics.get("fingerprint") != evaluation_fingerprint(emb_meta, config.evaluate):
        raise PhaseInputError(f"the evaluation of {eval_tag} is not of its current embeddings (or was made with "
                              f"other evaluate settings): run `python run.py {phase}` again")
    if loss == PRETRAINED:
        return None
    training_path = run_dir.train_dir(tag, loss) / "training.json"
    training = atomic.read_json(training_path) if training_path.is_file() else {}
    if not training or not trained_embeddings_match(emb_meta.get("fingerprint"), training, config.extract):
        raise PhaseInputError(f"the phase-4 embeddings of {eval_tag} are not of the model in {training_path.parent} "
                              "(it was retrained, or its training is unfinished): run `python run.py phase3` and "
                              "`python run.py phase4`")
    return training


def run_compare(config: RunConfig, command: str = "") -> Path:
    import pandas as pd

    from pipeline.reporting.compare_view import answers, comparison_view, render_comparison, table_rows, training_rows
    from pipeline.reporting.figures import copy_model_pictures
    from pipeline.reporting.plots import plot_metric_bars

    run_dir = RunDir(config)
    models = collect(config)
    report_dir = run_dir.report_dir
    rows = table_rows(models)
    with atomic.atomic_open(report_dir / "comparison.csv", "w", encoding="utf-8", newline="") as f:
        pd.DataFrame(rows).to_csv(f, index=False, float_format="%.4f")
    qa = answers(models)
    training = training_rows(models)
    atomic.write_json(report_dir / "comparison.json", {"rows": rows, "answers": qa, "training": training})

    bars = {f"{m['backbone']} · {m['loss']}": m["metrics"]["retrieval"]["unit/cosine"] for m in models}
    plot_metric_bars(bars, ["P@1", "P@k", "R@k", "mAP", "MAP@R"], report_dir / "img" / "compare" / "metric_bars.png",
                     "Every model, cosine on unit vectors (test queries)")
    view = comparison_view(config.name, datetime.now(timezone.utc).isoformat(timespec="seconds"), command, models,
                           rows, qa, training, copy_model_pictures(models, report_dir), "img/compare/metric_bars.png")
    path = render_comparison(report_dir, view)
    log.info("phase 5: %s", path)
    return path
