"""Phase 5: one report that compares backbones × losses × distances and answers the
user's questions (which backbone, which loss, cosine or euclidean, less anisotropy,
better neighbours) from the numbers of phases 2 and 4.

Writes `reports/<run>/comparison.html`, `comparison.csv` and `comparison.json`.
"""
from __future__ import annotations

import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.core import atomic
from pipeline.config import RunConfig
from pipeline.core.errors import PhaseInputError
from pipeline.phases.reevaluate import trained_embeddings_fingerprint, trained_tag
from pipeline.core.run_dir import RunDir, backbone_tag

log = logging.getLogger("embedlab.compare")

PRETRAINED = "pretrained"
METRICS = ("P@1", "P@k", "R@k", "mAP", "MAP@R", "R-precision")
DIAGNOSTICS = ("mean_pairwise_cosine", "effective_rank", "intra_inter_distance_ratio", "hubness_skew")


def collect(config: RunConfig) -> list[dict]:
    """One entry per (backbone, loss) model with its phase-2/4 metrics; pretrained first."""
    run_dir = RunDir(config)
    models = []
    for backbone in config.extract.backbones:
        tag = backbone_tag(backbone)
        for loss in [PRETRAINED, *config.train.losses]:
            eval_tag = tag if loss == PRETRAINED else trained_tag(tag, loss)
            path = run_dir.eval_dir(eval_tag) / "metrics.json"
            if not path.is_file():
                phase = "phase2" if loss == PRETRAINED else "phase4"
                raise PhaseInputError(f"no evaluation of {eval_tag} ({path} missing): run `python run.py {phase}` first")
            metrics = atomic.read_json(path)
            _check_current(run_dir, config, tag, loss, eval_tag, metrics)
            models.append({"backbone": tag, "loss": loss, "eval_tag": eval_tag, "eval_dir": path.parent,
                           "metrics": metrics})
    return models


def _check_current(run_dir: RunDir, config: RunConfig, tag: str, loss: str, eval_tag: str, metrics: dict) -> None:
    """The evaluation must be of the embeddings on disk, and those of the model phase 3 trained last.

    Otherwise the report would put one model's training details beside another's scores.
    """
    from pipeline.phases.evaluate import evaluation_fingerprint

    phase = "phase2" if loss == PRETRAINED else "phase4"
    emb_meta_path = run_dir.embeddings_dir(eval_tag) / "meta.json"
    emb_meta = atomic.read_json(emb_meta_path) if emb_meta_path.is_file() else {}
    if metrics.get("fingerprint") != evaluation_fingerprint(emb_meta, config.evaluate):
        raise PhaseInputError(f"the evaluation of {eval_tag} is not of its current embeddings (or was made with "
                              f"other evaluate settings): run `python run.py {phase}` again")
    if loss == PRETRAINED:
        return
    training_path = run_dir.train_dir(tag, loss) / "training.json"
    training = atomic.read_json(training_path) if training_path.is_file() else {}
    if not training or emb_meta.get("fingerprint") != trained_embeddings_fingerprint(training, config.extract):
        raise PhaseInputError(f"the phase-4 embeddings of {eval_tag} are not of the model in {training_path.parent} "
                              "(it was retrained, or its training is unfinished): run `python run.py phase3` and "
                              "`python run.py phase4`")


def table_rows(models: list[dict]) -> list[dict]:
    rows = []
    for model in models:
        m = model["metrics"]
        for variant, scores in m["retrieval"].items():
            which = variant.split("/")[0]
            diag = m["diagnostics"].get(which, {})
            rows.append({
                "backbone": model["backbone"], "loss": model["loss"], "variant": variant,
                **{name: scores.get(name) for name in METRICS},
                **{name: diag.get(name) for name in DIAGNOSTICS},
                "NMI": m.get("clustering", {}).get(which, {}).get("NMI"),
            })
    return rows


def training_rows(config: RunConfig, models: list[dict]) -> list[dict]:
    """How each trained model was trained, from its training.json (models without one are skipped)."""
    run_dir = RunDir(config)
    rows = []
    for model in models:
        if model["loss"] == PRETRAINED:
            continue
        path = run_dir.train_dir(model["backbone"], model["loss"]) / "training.json"
        if not path.is_file():
            continue
        t = atomic.read_json(path)
        hard = t.get("hard_negatives") or {}
        rows.append({
            "backbone": model["backbone"], "loss": model["loss"], "mode": t.get("mode", "head"),
            "positives": t.get("positives", "label"), "hard_negative_share": hard.get("share", 0.0),
            "epochs_run": t.get("epochs_run"), "best_epoch": t.get("best_epoch"),
            "val_MAP@R_before": (t.get("initial_val") or {}).get("MAP@R"),
            "val_MAP@R_best": (t.get("best_val") or {}).get("MAP@R"),
            "steps_per_second": t.get("steps_per_second"), "replicas": (t.get("distribution") or {}).get("replicas", 1),
            "mixed_precision": bool(t.get("mixed_precision", False)),
            "batch": f"{t['batch']['n_classes']}×{t['batch']['n_samples_per_class']}" if t.get("batch") else "",
        })
    return rows


def _score(model: dict, variant: str = "unit/cosine", metric: str = "MAP@R") -> float:
    return float(model["metrics"]["retrieval"][variant][metric])


def answers(models: list[dict]) -> list[dict]:
    """The user's five questions, each answered with the numbers behind it."""
    out = []
    backbones = sorted({m["backbone"] for m in models})
    losses = [loss for loss in dict.fromkeys(m["loss"] for m in models) if loss != PRETRAINED]
    by = {(m["backbone"], m["loss"]): m for m in models}

    best_per_backbone = {b: max((m for m in models if m["backbone"] == b), key=_score) for b in backbones}
    ranked = sorted(best_per_backbone.values(), key=_score, reverse=True)
    if len(backbones) == 1:
        text = (f"Only one backbone ran ({backbones[0]}): its best model is {ranked[0]['loss']} with MAP@R "
                f"{_score(ranked[0]):.3f}. Add --backbone to compare architectures.")
    else:
        best = ranked[0]
        others = "; ".join(f"{m['backbone']} {_score(m):.3f} ({m['loss']})" for m in ranked[1:])
        pre = "; ".join(f"{b} {_score(by[(b, PRETRAINED)]):.3f}" for b in backbones)
        text = (f"{best['backbone']} works best: MAP@R {_score(best):.3f} with {best['loss']}, against {others}. "
                f"Pretrained only: {pre}.")
    out.append({"question": "Which backbone works best?", "answer": text})

    if losses:
        gains = {}
        for loss in losses:
            deltas = [_score(by[(b, loss)]) - _score(by[(b, PRETRAINED)]) for b in backbones]
            gains[loss] = float(np.mean(deltas))
        best_loss = max(gains, key=gains.get)
        ratio_before = np.mean([by[(b, PRETRAINED)]["metrics"]["diagnostics"]["unit"]["intra_inter_distance_ratio"]
                                for b in backbones])
        ratio_after = np.mean([by[(b, best_loss)]["metrics"]["diagnostics"]["unit"]["intra_inter_distance_ratio"]
                               for b in backbones])
        listing = ", ".join(f"{loss} {gain:+.3f}" for loss, gain in sorted(gains.items(), key=lambda x: -x[1]))
        text = (f"{best_loss} gave the most discriminative embeddings: MAP@R {gains[best_loss]:+.3f} over the "
                f"pretrained baseline (mean over backbones; all losses: {listing}). Its intra/inter-class distance "
                f"ratio is {ratio_after:.3f} against {ratio_before:.3f} before training (lower = tighter classes).")
    else:
        text = "No loss was trained (phase 3): only pretrained embeddings can be compared."
    out.append({"question": "Which loss gave the most discriminative embeddings?", "answer": text})

    wins, diffs = 0, []
    for m in models:
        cos, raw = _score(m, "unit/cosine"), _score(m, "raw/euclidean")
        diffs.append(cos - raw)
        wins += cos > raw
    trained_note = " (raw = the head's output before L2 normalisation for trained models)" if losses else ""
    out.append({"question": "Does cosine or euclidean work better now?", "answer": (
        f"On unit vectors they rank identically (‖a−b‖² = 2 − 2·cos). Cosine on unit vectors beats euclidean on "
        f"un-normalised features in {wins} of {len(models)} models, mean MAP@R difference {np.mean(diffs):+.3f}"
        f"{trained_note}.")})

    if losses:
        lines, fewer = [], 0
        for b in backbones:
            before = by[(b, PRETRAINED)]["metrics"]["diagnostics"]["unit"]
            for loss in losses:
                after = by[(b, loss)]["metrics"]["diagnostics"]["unit"]
                fewer += after["mean_pairwise_cosine"] < before["mean_pairwise_cosine"]
                lines.append(f"{b}+{loss}: mean pairwise cosine {before['mean_pairwise_cosine']:.3f} → "
                             f"{after['mean_pairwise_cosine']:.3f}, effective rank {before['effective_rank']:.1f} → "
                             f"{after['effective_rank']:.1f} (of {after['dim']})")
        verdict = "Yes" if fewer == len(lines) else ("Partly" if fewer else "No")
        text = f"{verdict}: anisotropy went down for {fewer} of {len(lines)} trained models. " + "; ".join(lines) + "."
    else:
        text = "No trained model to compare with."
    out.append({"question": "Did anisotropy go down?", "answer": text})

    if losses:
        lines = []
        for b in backbones:
            before = by[(b, PRETRAINED)]["metrics"]
            for loss in losses:
                after = by[(b, loss)]["metrics"]
                better, total = _classes_improved(before, after)
                lines.append(f"{b}+{loss}: P@1 {_score(by[(b, PRETRAINED)], metric='P@1'):.3f} → "
                             f"{_score(by[(b, loss)], metric='P@1'):.3f}, R@k "
                             f"{_score(by[(b, PRETRAINED)], metric='R@k'):.3f} → {_score(by[(b, loss)], metric='R@k'):.3f},"
                             f" MAP@R better for {better} of {total} classes")
        text = "; ".join(lines) + ". The neighbour grids below show the same queries before and after."
    else:
        text = "No trained model to compare with."
    out.append({"question": "Do neighbours reflect semantic similarity better now?", "answer": text})
    return out


def _classes_improved(before: dict, after: dict) -> tuple[int, int]:
    old = {c["class"]: c.get("MAP@R") for c in before.get("per_class", [])}
    better = total = 0
    for c in after.get("per_class", []):
        if c.get("MAP@R") is None or old.get(c["class"]) is None:
            continue
        total += 1
        better += c["MAP@R"] > old[c["class"]]
    return better, total


def run_compare(config: RunConfig, command: str = "") -> Path:
    import jinja2
    import pandas as pd

    from pipeline.reporting.plots import plot_metric_bars
    from pipeline.reporting.report import TEMPLATE_DIR

    run_dir = RunDir(config)
    models = collect(config)
    report_dir = run_dir.report_dir
    img = report_dir / "img" / "compare"
    img.mkdir(parents=True, exist_ok=True)
    rows = table_rows(models)
    with atomic.atomic_open(report_dir / "comparison.csv", "w", encoding="utf-8", newline="") as f:
        pd.DataFrame(rows).to_csv(f, index=False, float_format="%.4f")
    qa = answers(models)
    training = training_rows(config, models)
    atomic.write_json(report_dir / "comparison.json", {"rows": rows, "answers": qa, "training": training})

    bars = {f"{m['backbone']} · {m['loss']}": m["metrics"]["retrieval"]["unit/cosine"] for m in models}
    plot_metric_bars(bars, ["P@1", "P@k", "R@k", "mAP", "MAP@R"], img / "metric_bars.png",
                     "Every model, cosine on unit vectors (test queries)")
    pictures = []
    for m in models:
        entry = {"title": f"{m['backbone']} · {m['loss']}", "projections": None, "grid": None}
        for key, name in (("projections", "projections.png"), ("grid", "grid_unit_cosine.png")):
            source = m["eval_dir"] / "plots" / name
            if source.is_file():
                target = img / f"{m['eval_tag'].replace('+', '_')}_{name}"
                with atomic.atomic_path(target) as tmp:
                    shutil.copyfile(source, tmp)
                entry[key] = target.relative_to(report_dir).as_posix()
        pictures.append(entry)

    k = models[0]["metrics"]["protocol"]["k"]
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), autoescape=True)
    html = env.get_template("compare.html.j2").render(
        run=config.name, created=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=command,
        rows=rows, answers=qa, k=k, metrics=METRICS, diagnostics=DIAGNOSTICS, training=training,
        bars="img/compare/metric_bars.png", pictures=pictures,
        protocol=models[0]["metrics"]["protocol"],
        best={name: max((r[name] for r in rows if r[name] is not None), default=None) for name in METRICS},
    )
    path = report_dir / "comparison.html"
    atomic.write_text(path, html)
    log.info("phase 5: %s", path)
    return path
