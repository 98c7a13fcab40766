"""Ensembles (`evaluate.ensembles`) as embedding sets: combined from their members' artifacts, then evaluated,
compared and exported like every other model.

An ensemble of phase-1 backbones is written by phase 2, one with a trained member (`<backbone>+<loss>`) by
phase 4, each as `runs/<run>/embeddings/<ensemble tag>/` with the files of any embedding set ("raw" = the
weighted combination before its final normalisation; pipeline/vectors/ensemble.py), so phase 2's
`evaluate_backbone` scores it unchanged. Every ensemble of a phase is checked (members on disk, of the run's
dataset, holding the same items in the same order, dimensions that the combine allows) before any is written.
meta.json's "ensemble" lists the members; its fingerprint holds theirs, so a member re-extracted or retrained
makes the ensemble out of date (phase 5 refuses a stale one, naming the phase to rerun).
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone

import numpy as np

from pipeline.config import EnsembleConfig, RunConfig
from pipeline.core import atomic
from pipeline.core.artifacts import (
    evaluation_fingerprint, fingerprint_of, is_current, load_embeddings, remove_text_artifacts,
    write_embedding_artifacts,
)
from pipeline.core.errors import PhaseInputError
from pipeline.core.run_dir import RunDir, backbone_tag
from pipeline.vectors.ensemble import EnsembleError, check_members, combine_embeddings

__all__ = ["ENSEMBLE_LOSS", "ensemble_entries", "ensembles_for_phase", "is_ensemble", "member_tags",
           "write_ensembles"]

log = logging.getLogger("embedlab.ensemble")

# What phase 5's table shows in the "loss" column of an ensemble.
ENSEMBLE_LOSS = "ensemble"


def is_ensemble(meta: dict) -> bool:
    return isinstance(meta.get("ensemble"), dict)


def member_tags(meta: dict) -> list[str]:
    return list(meta["ensemble"]["members"]) if is_ensemble(meta) else []


def ensembles_for_phase(config: RunConfig, trained: bool) -> list[EnsembleConfig]:
    """Phase 2's ensembles (every member a phase-1 backbone of the run), or phase 4's (the others)."""
    phase1 = {backbone_tag(b) for b in config.extract.backbones}
    return [e for e in config.evaluate.ensembles if all(m in phase1 for m in e.members) != trained]


def _phase(member: str, config: RunConfig) -> str:
    return "phase1" if member in {backbone_tag(b) for b in config.extract.backbones} else "phase3` and `phase4"


def _load_members(run_dir: RunDir, ensemble: EnsembleConfig, dataset_meta: dict | None) -> list[tuple]:
    """(tag, items, unit, meta) of every member, checked to hold the same items in the same order."""
    members = []
    for tag in ensemble.members:
        if not (run_dir.embeddings_dir(tag) / "meta.json").is_file():
            raise PhaseInputError(f"ensemble {ensemble.tag()}: no embeddings of member {tag} in "
                                  f"{run_dir.embeddings_dir(tag)}: run `python run.py "
                                  f"{_phase(tag, run_dir.config)}` first (members are embedding tags of this run)")
        items, unit, _, meta = load_embeddings(run_dir.embeddings_dir(tag), dataset_meta, run_dir.config.name)
        members.append((tag, items, unit, meta))
    first_tag, first_items = members[0][0], members[0][1]
    for tag, items, _, _ in members[1:]:
        if items["id"].tolist() != first_items["id"].tolist():
            raise PhaseInputError(f"ensemble {ensemble.tag()}: members {first_tag} and {tag} hold other items (or "
                                  "in another order): extract both from the run's dataset again")
    try:
        check_members([u.shape[1] for _, _, u, _ in members], ensemble.combine, ensemble.weights,
                      [f"{tag}" for tag, *_ in members])
    except EnsembleError as exc:
        raise PhaseInputError(f"ensemble {ensemble.tag()}: {exc}") from None
    return members


def ensemble_fingerprint(member_metas: list[tuple[str, dict]], ensemble: EnsembleConfig, extract) -> str:
    """What an ensemble's embeddings were computed from: its members' embeddings (each one's fingerprint and the
    moment it was written), the combination, and the storage settings."""
    return fingerprint_of({"members": [[tag, meta.get("fingerprint"), meta.get("created")]
                                       for tag, meta in member_metas],
                           "combine": ensemble.combine, "weights": [float(w) for w in ensemble.weights],
                           "dtype": extract.dtype, "index": extract.index, "json": extract.write_json})


def write_ensembles(run_dir: RunDir, dataset_meta: dict | None, trained: bool, force: bool = False) -> list[str]:
    """Check, then write (where not up to date) the ensembles of the run's configuration for phase 2
    (`trained=False`) or phase 4; returns their tags, for the phase to evaluate."""
    config = run_dir.config
    chosen = ensembles_for_phase(config, trained)
    loaded = [(e, _load_members(run_dir, e, dataset_meta)) for e in chosen]   # every check before any write
    tags = []
    for ensemble, members in loaded:
        tag = ensemble.tag()
        out = run_dir.embeddings_dir(tag)
        fingerprint = ensemble_fingerprint([(t, meta) for t, _, _, meta in members], ensemble, config.extract)
        tags.append(tag)
        if not force and is_current(out / "meta.json", fingerprint):
            log.info("%s: ensemble %s is up to date", "phase 4" if trained else "phase 2", tag)
            continue
        raw, unit = combine_embeddings([u for _, _, u, _ in members], ensemble.combine, ensemble.weights or None)
        (out / "meta.json").unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        items = members[0][1].drop(columns=["has_text"], errors="ignore")   # no text side in a combined space
        write_embedding_artifacts(out, items, raw, unit, config.extract)
        remove_text_artifacts(out)
        atomic.write_json(out / "meta.json", _meta(tag, ensemble, members, unit, fingerprint, config))
        log.info("%s: wrote ensemble %s (%s of %s: %d × %d)", "phase 4" if trained else "phase 2", tag,
                 ensemble.combine, ", ".join(ensemble.members), *unit.shape)
    return tags


def _meta(tag: str, ensemble: EnsembleConfig, members: list[tuple], unit: np.ndarray, fingerprint: str,
          config: RunConfig) -> dict:
    metas = [meta for _, _, _, meta in members]
    rates = [meta.get("throughput_img_s") for meta in metas]
    weights = [float(w) for w in ensemble.weights] or [1.0] * len(members)
    return {
        "tag": tag, "trained": False, "dim": int(unit.shape[1]), "n_items": int(len(unit)),
        "ensemble": {"members": list(ensemble.members), "combine": ensemble.combine, "weights": weights,
                     "member_dims": [int(u.shape[1]) for _, _, u, _ in members],
                     "member_image_sizes": [meta.get("image_size") for meta in metas],
                     "member_losses": [meta.get("loss") or "pretrained" for meta in metas]},
        "backbone": {"name": "ensemble", "weights": ", ".join(dict.fromkeys(
            str((meta.get("backbone") or {}).get("weights", "")) for meta in metas))},
        "weights_loaded": "; ".join(f"{t}: {meta.get('weights_loaded')}" for t, _, _, meta in members),
        "image_size": max(int(meta.get("image_size") or 0) for meta in metas),
        # The members run one after another on each image: their times per image add up.
        "throughput_img_s": (1.0 / sum(1.0 / r for r in rates)) if all(r for r in rates) else None,
        "dataset": metas[0].get("dataset"), "dataset_fingerprint": metas[0].get("dataset_fingerprint"),
        "dtype": config.extract.dtype, "text": None, "fingerprint": fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def ensemble_entries(run_dir: RunDir, config: RunConfig) -> list[dict]:
    """Phase 5's entries of the configured ensembles ({"backbone": tag, "loss": "ensemble", "eval_tag",
    "eval_dir", "metrics", "training": None, "ensemble": meta's "ensemble"}), each checked to be the evaluation
    of the ensemble of its members as they are now."""
    entries = []
    for ensemble in config.evaluate.ensembles:
        tag = ensemble.tag()
        phase = "phase4" if ensemble in ensembles_for_phase(config, trained=True) else "phase2"
        metrics_path, meta_path = run_dir.eval_dir(tag) / "metrics.json", run_dir.embeddings_dir(tag) / "meta.json"
        if not metrics_path.is_file() or not meta_path.is_file():
            raise PhaseInputError(f"no evaluation of ensemble {tag} ({metrics_path} missing): run "
                                  f"`python run.py {phase}` first")
        meta, metrics = atomic.read_json(meta_path), atomic.read_json(metrics_path)
        current = []
        for member in ensemble.members:
            member_meta = run_dir.embeddings_dir(member) / "meta.json"
            current.append((member, atomic.read_json(member_meta) if member_meta.is_file() else {}))
        if meta.get("fingerprint") != ensemble_fingerprint(current, ensemble, config.extract) or \
                metrics.get("fingerprint") != evaluation_fingerprint(meta, config.evaluate):
            raise PhaseInputError(f"the evaluation of ensemble {tag} is not of its members' current embeddings "
                                  f"(or of other evaluate settings): run `python run.py {phase}` again")
        entries.append({"backbone": tag, "loss": ENSEMBLE_LOSS, "eval_tag": tag, "eval_dir": metrics_path.parent,
                        "metrics": metrics, "training": None, "ensemble": meta["ensemble"]})
    return entries
