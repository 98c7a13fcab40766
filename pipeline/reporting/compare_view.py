"""Phase 5's report: the comparison table, how each model was trained, and the answers to the user's five
questions, built from the models' phase-2/4 metrics (phases/compare.py collects them).

Answers follow from every number they cite: a score that could not be computed is said so, a comparison on
too few queries says it cannot conclude, and "less anisotropy" distinguishes a wider cone from a collapse of
the dimensions used (readings.anisotropy_change).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.reporting.formatting import best_flags, fmt, get, render_html, to_float
from pipeline.reporting.readings import NEGLIGIBLE, anisotropy_change, small_sample_note
from pipeline.vectors.retrieval import SCORE_NAMES

PRETRAINED = "pretrained"
METRICS = SCORE_NAMES
DIAGNOSTICS = ("mean_pairwise_cosine", "effective_rank", "intra_inter_distance_ratio", "hubness_skew")
TEMPLATE = "compare.html.j2"
# Originals and their versions (metrics.json's "groups", cosine on unit vectors): column -> where it is read.
GROUP_METRICS = {
    "group R@1": ("groups", "retrieval", "original_to_versions", "R@1"),
    "group MAP@R": ("groups", "retrieval", "original_to_versions", "MAP@R"),
    "group AUC": ("groups", "closeness", "auc", "random", "cosine", "auc"),
}


def score(model: dict, variant: str = "unit/cosine", metric: str = "MAP@R") -> float | None:
    """A model's score, or None where it could not be computed (NaN: no query had a positive)."""
    return to_float(get(model, "metrics", "retrieval", variant, metric))


def has_groups(models: list[dict]) -> bool:
    """Whether any model was scored on originals and their versions (the table then has the group columns)."""
    return any(get(m, "metrics", "groups", "retrieval") is not None for m in models)


def table_rows(models: list[dict]) -> list[dict]:
    """One row per model and variant; with groups, the group metrics on the unit/cosine rows (where they were
    measured) and None on the others."""
    grouped = has_groups(models)
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
            if grouped:
                rows[-1].update({name: get(m, *path) if variant == "unit/cosine" else None
                                 for name, path in GROUP_METRICS.items()})
    return rows


def _auc_text(auc) -> str:
    value, low, high = to_float(get(auc, "auc")), *((list(get(auc, "ci95") or []) + [None, None])[:2])
    if value is None:
        return fmt(None)
    if to_float(low) is None or to_float(high) is None:
        return fmt(value)
    return f"{fmt(value)} ({fmt(to_float(low))}–{fmt(to_float(high))})"


def group_rows(models: list[dict]) -> list[dict]:
    """Every model's originals-and-versions numbers (phase 4's trained models have no other page showing them):
    both retrieval directions, the AUCs with their intervals, and how many neighbours training kept."""
    rows = []
    for model in models:
        groups = get(model, "metrics", "groups")
        if not isinstance(groups, dict) or "retrieval" not in groups:
            continue
        forward, reverse = (groups["retrieval"].get(d) or {} for d in ("original_to_versions", "version_to_original"))
        kept = get(groups, "neighbourhood", "before_after", "mean")
        rows.append({"backbone": model["backbone"], "loss": model["loss"],
                     "groups": fmt(get(groups, "protocol", "n_groups")),
                     "cells": [fmt(to_float(v)) for v in (forward.get("R@1"), forward.get("MAP@R"), reverse.get("R@1"),
                                                          get(groups, "closeness", "measures", "cosine", "versions",
                                                              "mean"))],
                     "auc": [_auc_text(get(groups, "closeness", "auc", kind, "cosine"))
                             for kind in ("random", "same_class")],
                     "kept": fmt(to_float(kept))})
    return rows


def training_rows(models: list[dict]) -> list[dict]:
    """How each trained model was trained, from its training.json (`model["training"]`; models without
    one are skipped)."""
    rows = []
    for model in models:
        t = model.get("training")
        if model["loss"] == PRETRAINED or not t:
            continue
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


def classes_improved(before: dict, after: dict) -> tuple[int, int]:
    """(classes whose MAP@R rose, classes scored both times)."""
    old = {c["class"]: c.get("MAP@R") for c in before.get("per_class", [])}
    better = total = 0
    for c in after.get("per_class", []):
        if c.get("MAP@R") is None or old.get(c["class"]) is None:
            continue
        total += 1
        better += c["MAP@R"] > old[c["class"]]
    return better, total


def _fewest_scored(models: list[dict]) -> int | None:
    counts = [to_float(get(m, "metrics", "retrieval", "unit/cosine", "n_queries_evaluated")) for m in models]
    counts = [int(c) for c in counts if c is not None]
    return min(counts) if counts else None


def _with_note(text: str, note: str) -> str:
    return f"{text} {note}" if note else text


def _backbone_answer(models: list[dict], backbones: list[str], by: dict) -> str:
    scored = [m for m in models if score(m) is not None]
    if not scored:
        reasons = [get(m, "metrics", "scoring_note") for m in models if get(m, "metrics", "scoring_note")]
        return f"No model could be scored: {reasons[0] if reasons else 'no query has a positive in the gallery'}."
    best_per_backbone = {b: max((m for m in scored if m["backbone"] == b), key=score)
                         for b in backbones if any(m["backbone"] == b for m in scored)}
    ranked = sorted(best_per_backbone.values(), key=score, reverse=True)
    if len(backbones) == 1:
        return (f"Only one backbone ran ({backbones[0]}): its best model is {ranked[0]['loss']} with MAP@R "
                f"{score(ranked[0]):.3f}. Add --backbone to compare architectures.")
    best = ranked[0]
    others = "; ".join(f"{m['backbone']} {score(m):.3f} ({m['loss']})" for m in ranked[1:])
    pre = "; ".join(f"{b} {fmt(score(by[(b, PRETRAINED)]))}" for b in backbones if (b, PRETRAINED) in by)
    return (f"{best['backbone']} works best: MAP@R {score(best):.3f} with {best['loss']}, against "
            f"{others or 'no other scored backbone'}. Pretrained only: {pre}.")


def _loss_answer(losses: list[str], backbones: list[str], by: dict) -> str:
    gains = {}
    for loss in losses:
        # Not every backbone has every loss (distillation: the teacher's loss on one, "distill" on the students).
        deltas = [score(by[(b, loss)]) - score(by[(b, PRETRAINED)]) for b in backbones
                  if (b, loss) in by and score(by[(b, loss)]) is not None and score(by[(b, PRETRAINED)]) is not None]
        if deltas:
            gains[loss] = float(np.mean(deltas))
    if not gains:
        return "No trained model could be scored against its pretrained baseline."
    best_loss = max(gains, key=gains.get)

    def mean_ratio(loss: str) -> float | None:
        values = [to_float(get(by[(b, loss)], "metrics", "diagnostics", "unit", "intra_inter_distance_ratio"))
                  for b in backbones if (b, loss) in by]
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    listing = ", ".join(f"{loss} {gain:+.3f}" for loss, gain in sorted(gains.items(), key=lambda x: -x[1]))
    if gains[best_loss] > NEGLIGIBLE:
        text = (f"{best_loss} gave the most discriminative embeddings: MAP@R {gains[best_loss]:+.3f} over the "
                f"pretrained baseline (mean over backbones; all losses: {listing}).")
    else:
        text = (f"No loss beat the pretrained baseline: the best, {best_loss}, changed MAP@R by "
                f"{gains[best_loss]:+.3f} (mean over backbones; all losses: {listing}).")
    before, after = mean_ratio(PRETRAINED), mean_ratio(best_loss)
    if before is not None and after is not None:
        text += (f" Its intra/inter-class distance ratio is {after:.3f} against {before:.3f} before training "
                 f"(lower = tighter classes).")
    return text


def _distance_answer(models: list[dict], trained: bool) -> str:
    pairs = [(score(m, "unit/cosine"), score(m, "raw/euclidean")) for m in models]
    pairs = [(c, r) for c, r in pairs if c is not None and r is not None]
    rule = "On unit vectors they rank identically (‖a−b‖² = 2 − 2·cos)."
    if not pairs:
        return f"{rule} No model has both scores to compare cosine with euclidean on un-normalised features."
    wins = sum(c > r for c, r in pairs)
    trained_note = " (raw = the head's output before L2 normalisation for trained models)" if trained else ""
    return (f"{rule} Cosine on unit vectors beats euclidean on un-normalised features in {wins} of {len(pairs)} "
            f"models, mean MAP@R difference {np.mean([c - r for c, r in pairs]):+.3f}{trained_note}.")


def _anisotropy_answer(losses: list[str], backbones: list[str], by: dict) -> str:
    lines, verdicts = [], []
    for b in backbones:
        before = get(by[(b, PRETRAINED)], "metrics", "diagnostics", "unit", default={}) or {}
        for loss in (loss for loss in losses if (b, loss) in by):
            after = get(by[(b, loss)], "metrics", "diagnostics", "unit", default={}) or {}
            change = anisotropy_change(before, after)
            verdicts.append(change["verdict"])
            how = ", ".join(change["better"] + change["worse"]) or "no clear change"
            lines.append(f"{b}+{loss}: mean pairwise cosine {fmt(before.get('mean_pairwise_cosine'))} → "
                         f"{fmt(after.get('mean_pairwise_cosine'))}, effective rank "
                         f"{fmt(before.get('effective_rank'), 1)} → {fmt(after.get('effective_rank'), 1)} "
                         f"(of {fmt(after.get('dim'))}): {change['verdict']} ({how})")
    total = len(verdicts)
    yes, mixed, no = (verdicts.count(v) for v in ("yes", "mixed", "no"))
    verdict = "Yes" if yes == total else "No" if no == total else "Mixed" if mixed else "Partly"
    text = f"{verdict}: anisotropy went down for {yes} of {total} trained models"
    if mixed:
        text += (f"; for {mixed} the two measures disagree (a wider cone with fewer dimensions used is a "
                 f"dimensional collapse, a narrower space rather than a more isotropic one)")
    return (text + ". Mean pairwise cosine measures the cone (lower = wider); effective rank counts the "
            "dimensions really used (lower = collapse). " + "; ".join(lines) + ".")


def _neighbour_answer(losses: list[str], backbones: list[str], by: dict) -> str:
    lines = []
    for b in backbones:
        before = by[(b, PRETRAINED)]
        for loss in (loss for loss in losses if (b, loss) in by):
            after = by[(b, loss)]
            better, total = classes_improved(before["metrics"], after["metrics"])
            lines.append(f"{b}+{loss}: P@1 {fmt(score(before, metric='P@1'))} → {fmt(score(after, metric='P@1'))}, "
                         f"R@k {fmt(score(before, metric='R@k'))} → {fmt(score(after, metric='R@k'))},"
                         f" MAP@R better for {better} of {total} classes")
    return "; ".join(lines) + ". The neighbour grids below show the same queries before and after."


def _ensemble_answer(ensembles: list[dict], members: dict) -> str:
    """Each ensemble's MAP@R and P@1 against its best member (models keyed by their embedding tag)."""
    lines = []
    for e in ensembles:
        tags = e["ensemble"]["members"]
        scored = [members[t] for t in tags if t in members and score(members[t]) is not None]
        listing = ", ".join(f"{t} {fmt(score(members[t])) if t in members else 'not compared'}" for t in tags)
        head = (f"{e['backbone']} ({e['ensemble']['combine']} of {len(tags)}): MAP@R {fmt(score(e))}, "
                f"P@1 {fmt(score(e, metric='P@1'))}; members {listing}")
        if score(e) is None or not scored:
            lines.append(f"{head}: nothing to compare")
            continue
        best = max(scored, key=score)
        gain = score(e) - score(best)
        verdict = "beats" if gain > NEGLIGIBLE else "does not beat" if gain < -NEGLIGIBLE else "ties"
        lines.append(f"{head}: it {verdict} its best member {best['eval_tag']} (MAP@R {gain:+.3f}, P@1 "
                     f"{fmt(score(best, metric='P@1'))} → {fmt(score(e, metric='P@1'))})")
    return "; ".join(lines) + "."


def answers(models: list[dict]) -> list[dict]:
    """The user's five questions, each answered with the numbers behind it (and a sixth, whether each ensemble
    beats its members, when the run has ensembles)."""
    ensembles = [m for m in models if m.get("ensemble")]
    if ensembles:
        by_tag = {m["eval_tag"]: m for m in models}
        found = answers([m for m in models if not m.get("ensemble")])
        return found + [{"question": "Does an ensemble beat its members?", "answer": _with_note(
            _ensemble_answer(ensembles, by_tag), small_sample_note(_fewest_scored(ensembles)))}]
    backbones = sorted({m["backbone"] for m in models})
    losses = [loss for loss in dict.fromkeys(m["loss"] for m in models) if loss != PRETRAINED]
    by = {(m["backbone"], m["loss"]): m for m in models}
    caution = small_sample_note(_fewest_scored(models))
    none_trained = "No trained model to compare with."
    return [
        {"question": "Which backbone works best?",
         "answer": _with_note(_backbone_answer(models, backbones, by), caution)},
        {"question": "Which loss gave the most discriminative embeddings?",
         "answer": _with_note(_loss_answer(losses, backbones, by), caution) if losses
         else "No loss was trained (phase 3): only pretrained embeddings can be compared."},
        {"question": "Does cosine or euclidean work better now?",
         "answer": _with_note(_distance_answer(models, bool(losses)), caution)},
        {"question": "Did anisotropy go down?",
         "answer": _anisotropy_answer(losses, backbones, by) if losses else none_trained},
        {"question": "Do neighbours reflect semantic similarity better now?",
         "answer": _with_note(_neighbour_answer(losses, backbones, by), caution) if losses else none_trained},
    ]


def _cell(value: Any, best: bool = False) -> dict:
    return {"text": fmt(to_float(value)), "best": best}


def comparison_view(run: str, created: str, command: str, models: list[dict], rows: list[dict],
                    qa: list[dict], training: list[dict], pictures: list[dict], bars: str) -> dict:
    """Everything compare.html.j2 shows, formatted, with the best cell of each metric column flagged."""
    group_columns = [name for name in GROUP_METRICS if rows and name in rows[0]]
    flags = {name: best_flags([r[name] for r in rows]) for name in [*METRICS, *group_columns]}
    table = []
    for i, r in enumerate(rows):
        table.append({
            "backbone": r["backbone"], "loss": r["loss"], "variant": r["variant"],
            "cells": [_cell(r[name], flags[name][i]) for name in METRICS] + [_cell(r["NMI"])]
            + [_cell(r[name]) for name in DIAGNOSTICS] + [_cell(r[name], flags[name][i]) for name in group_columns],
        })
    protocol = models[0]["metrics"]["protocol"]
    return {"run": run, "created": created, "command": command, "answers": qa, "k": protocol["k"],
            "metrics": METRICS, "rows": table, "training": training, "bars": bars, "pictures": pictures,
            "protocol": protocol, "group_columns": group_columns, "group_rows": group_rows(models)}


def render_comparison(report_dir: Path, view: dict) -> Path:
    return render_html(TEMPLATE, view, Path(report_dir) / "comparison.html")
