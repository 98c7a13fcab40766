"""The data protocol of phase 3, shared by every mode: which items are positives of each other
(pair keys), which train and which validate, which can be used at all, how batches are sized,
and which negatives seed them.

Validation is retrieval, the thing the model is for: after every epoch the model embeds
the validation items and P@1 / MAP@R are computed leave-one-out by cosine. The validation
items are the "val" split when it has at least two classes with two or more items.
Otherwise a seeded share (`train.holdout_fraction`) of the training data validates and is
trained on by no one:
    holdout_classes   whole training classes (class-disjoint, as in the unseen-class
                      protocol), when the classes left still fill a batch
                      (`train.n_classes_per_batch`)
    holdout_items     with fewer classes, that share of the items of every training class
                      (stratified): taking classes away would leave batches with fewer
                      classes than asked for, and a loss with fewer negatives to learn from,
                      while the validation would rest on one or two classes
"""
from __future__ import annotations

import logging
import math
import time
from typing import NamedTuple

import numpy as np

from pipeline.config import TrainConfig
from pipeline.core.errors import PhaseInputError
from pipeline.training.sampler import split_usable_classes

log = logging.getLogger("embedlab.train")


def pair_keys(items, settings: TrainConfig) -> np.ndarray:
    """Per item, the integer key that makes two items positives: the class label, or the group.

    With `positives: group`, items without a group form a group of their own (and,
    having no positive, are left out of the batches by the sampler).
    """
    if settings.positives == "label":
        return items["label"].to_numpy()
    groups = items["group"].astype(str).to_numpy() if "group" in items else np.array([""] * len(items))
    if not (groups != "").any():
        raise PhaseInputError("train.positives is 'group' but no item has a group: give the source a 'group' "
                              "column (original and variants share one), or use train.positives=label")
    named = np.unique(groups[groups != ""], return_inverse=True)[1]
    keys = np.empty(len(groups), dtype=np.int64)
    keys[groups != ""] = named
    # Ungrouped items get keys after the named groups, one each.
    keys[groups == ""] = named.max(initial=-1) + 1 + np.arange(int((groups == "").sum()))
    return keys


def split_train_val(items, settings: TrainConfig,
                    keys: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Row indices to train on, to validate on, and a description of the protocol.

    `keys` (default: the labels) decide which validation items are positives of each other.
    """
    splits = items["split"].to_numpy()
    labels = items["label"].to_numpy() if keys is None else np.asarray(keys)
    train_rows = np.flatnonzero(splits == "train")
    if train_rows.size == 0:
        raise PhaseInputError(f"no items in split 'train' (splits present: {sorted(set(splits))}): "
                              "run phase0/phase1 with a training split")
    val_rows = np.flatnonzero(splits == "val")
    val_usable, _ = split_usable_classes(labels[val_rows])
    if val_usable.size >= 2:
        return train_rows, val_rows, {
            "protocol": "val_split", "n_items": int(val_rows.size), "n_classes": int(np.unique(labels[val_rows]).size),
            "n_classes_with_positives": int(val_usable.size)}

    # No usable validation split. Counted among the classes (groups) that can be scored:
    # an item alone in its class has no positive.
    candidates, _ = split_usable_classes(labels[train_rows])
    n_hold = max(2, int(round(settings.holdout_fraction * candidates.size)))
    kind = "groups" if settings.positives == "group" else "classes"
    if settings.holdout_fraction <= 0:
        raise PhaseInputError(
            f"no usable 'val' split (it needs 2 {kind} with 2+ items; it has {val_usable.size}) and "
            f"train.holdout_fraction={settings.holdout_fraction} holds nothing out for validation")
    if candidates.size - n_hold >= settings.n_classes_per_batch:
        return _hold_out_classes(train_rows, labels, candidates, n_hold, settings, kind)
    return _hold_out_items(train_rows, labels, candidates, n_hold, settings, kind, val_usable.size)


def _hold_out_classes(train_rows, labels, candidates, n_hold: int, settings: TrainConfig, kind: str):
    """Whole training classes validate, so validation measures what the unseen-class protocol
    measures and never overlaps training."""
    rng = np.random.default_rng(settings.seed)
    held_out = np.sort(rng.choice(candidates, size=n_hold, replace=False))
    in_holdout = np.isin(labels[train_rows], held_out)
    log.warning("phase 3: no usable 'val' split; validating on %d held-out training %s (%.0f %%, seed %d), "
                "disjoint from training", n_hold, kind, 100 * settings.holdout_fraction, settings.seed)
    return train_rows[~in_holdout], train_rows[in_holdout], {
        "protocol": "holdout_classes", "holdout_fraction": settings.holdout_fraction, "seed": settings.seed,
        "n_items": int(in_holdout.sum()), "n_classes": int(n_hold), "n_classes_with_positives": int(n_hold),
        # Class labels, or group keys with train.positives=group.
        "held_out_labels": held_out.tolist()}


def _hold_out_items(train_rows, labels, candidates, n_hold: int, settings: TrainConfig, kind: str, n_val_usable):
    """A seeded share of every training class's items validates; each class keeps 2+ items to train on
    and gives 2+ to validation (an item's positive must be among them), or none when it is too small."""
    reason = (f"holding out {n_hold} of the {candidates.size} training {kind} would leave "
              f"{candidates.size - n_hold}, fewer than one batch's {settings.n_classes_per_batch} "
              f"(train.n_classes_per_batch)")
    rng = np.random.default_rng(settings.seed)
    train_keys = labels[train_rows]
    held = []
    for key in candidates:
        rows = train_rows[train_keys == key]
        n_val = max(2, int(round(settings.holdout_fraction * rows.size)))
        if rows.size - n_val >= 2:
            held.append(np.sort(rng.choice(rows, size=n_val, replace=False)))
    val_rows = np.sort(np.concatenate(held)) if held else np.empty(0, dtype=train_rows.dtype)
    if len(held) < 2:
        raise PhaseInputError(
            f"no usable 'val' split (it needs 2 {kind} with 2+ items; it has {n_val_usable}), {reason}, and "
            f"only {len(held)} training {kind} have the 4+ items needed to validate on some of their own: "
            "give the dataset a 'val' split")
    log.warning("phase 3: no usable 'val' split and %s; validating on %d held-out items (%.0f %%, seed %d) of %d "
                "training %s instead. These %s are also trained on: validation measures retrieval among seen "
                "%s, not generalisation to unseen ones", reason, val_rows.size, 100 * settings.holdout_fraction,
                settings.seed, len(held), kind, kind, kind)
    return np.setdiff1d(train_rows, val_rows), val_rows, {
        "protocol": "holdout_items", "holdout_fraction": settings.holdout_fraction, "seed": settings.seed,
        "n_items": int(val_rows.size), "n_classes": len(held), "n_classes_with_positives": len(held),
        "reason": reason}


def usable_training_rows(train_rows: np.ndarray, keys: np.ndarray, settings: TrainConfig, tag: str):
    """(the training rows whose class/group has 2+ training items, the keys left out).

    An item alone in its class (or group) has no positive: the sampler could never use
    it, and ArcFace would give it a class centre of its own, so it is left out here.
    """
    usable, single = split_usable_classes(keys[train_rows])
    if usable.size < 2:
        raise PhaseInputError(f"{tag}: training needs at least 2 {settings.positives}s with 2 or more training "
                              f"items; found {usable.size}")
    return train_rows[np.isin(keys[train_rows], usable)], single


class TrainingData(NamedTuple):
    """Which items a training uses, and how: per item its pair key; the rows that train and
    validate; the validation protocol; the keys left out for having a single training item."""
    keys: np.ndarray
    train_rows: np.ndarray
    val_rows: np.ndarray
    validation: dict
    single: np.ndarray

    @property
    def train_keys(self) -> np.ndarray:
        return self.keys[self.train_rows]

    @property
    def n_train_classes(self) -> int:
        return int(np.unique(self.train_keys).size)


def training_data(items, settings: TrainConfig, tag: str) -> TrainingData:
    """Pair keys, the train/validation split and the usable training rows of `items`."""
    keys = pair_keys(items, settings)
    train_rows, val_rows, validation = split_train_val(items, settings, keys)
    train_rows, single = usable_training_rows(train_rows, keys, settings, tag)
    return TrainingData(keys, train_rows, val_rows, validation, single)


class BatchPlan(NamedTuple):
    """P x K batches: `n_classes` classes (at most the training classes) of K items; `steps` per epoch."""
    n_classes: int
    size: int
    steps: int

    def summary(self, settings: TrainConfig) -> dict:
        return {"n_classes": int(self.n_classes), "n_samples_per_class": settings.n_samples_per_class,
                "size": int(self.size)}


def batch_plan(settings: TrainConfig, data: TrainingData) -> BatchPlan:
    n_classes = min(settings.n_classes_per_batch, data.n_train_classes)
    size = n_classes * settings.n_samples_per_class
    return BatchPlan(n_classes, size, settings.steps_per_epoch or math.ceil(len(data.train_rows) / size))


def hard_negatives(embeddings: np.ndarray, keys: np.ndarray, settings: TrainConfig,
                   groups: np.ndarray | None = None) -> np.ndarray | None:
    """Each training item's top-ranked negatives under the phase-1 baseline (None when not seeding).

    With `train.hard_negatives` other than its default (a refreshed table, random negatives mixed in), the
    table is mined as every refresh mines it (training/mining.py `mine_hard_negatives`, items of the same
    `groups` excluded too); otherwise exactly as before those settings existed."""
    if settings.hard_negative_share <= 0:
        return None
    from pipeline.training.mining import baseline_hard_negatives, mine_hard_negatives

    started = time.perf_counter()
    if settings.hard_negatives.source != "baseline" or settings.hard_negatives.random_share > 0:
        ranked, _ = mine_hard_negatives(embeddings, keys, settings.hard_negatives_per_item, groups=groups,
                                        random_share=settings.hard_negatives.random_share, seed=settings.seed)
    else:
        ranked = baseline_hard_negatives(embeddings, keys, n_negatives=settings.hard_negatives_per_item)
    log.info("phase 3: ranked the baseline's %d hardest negatives of %d training items in %.1f s",
             settings.hard_negatives_per_item, len(keys), time.perf_counter() - started)
    return ranked


# --------------------------------------------------------------------------- triplets of originals and versions

def group_anchors(items, keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per key among `rows` with 2+ items, its anchor: the first item whose items.csv `role` is "original",
    else (no role column, or no original) the key's first item in row order. Sorted row indices."""
    rows = np.asarray(rows)
    roles = items["role"].astype(str).to_numpy()[rows] if "role" in items else np.full(len(rows), "")
    anchors = []
    for key in np.unique(keys[rows]):
        members = rows[keys[rows] == key]
        if members.size < 2:
            continue
        originals = members[roles[keys[rows] == key] == "original"]
        anchors.append(originals[0] if originals.size else members[0])
    return np.sort(np.asarray(anchors, dtype=np.int64))


def validation_triplets(keys: np.ndarray, anchors: np.ndarray, baseline: np.ndarray, negatives: str,
                        seed: int) -> np.ndarray:
    """int64 (m, 3) positions (anchor, positive, negative) into the validation items.

    `keys`, `baseline` (the phase-1 embeddings) are the validation items'; `anchors` positions among them.
    Per anchor, every other member of its key is a positive; its negative is, with "random", a seeded draw
    among the items of other keys, with "hard" the item of another key that the baseline ranks closest to
    the anchor (one per anchor; sampler.baseline_hard_negatives).
    """
    rng = np.random.default_rng(seed)
    hardest = None
    if negatives == "hard":
        from pipeline.training.mining import baseline_hard_negatives

        hardest = baseline_hard_negatives(baseline, keys, n_negatives=1)[:, 0]
    triplets = []
    for anchor in np.asarray(anchors):
        others = np.flatnonzero(keys != keys[anchor])
        positives = np.flatnonzero(keys == keys[anchor])
        positives = positives[positives != anchor]
        if not others.size or not positives.size:
            continue
        chosen = np.full(positives.size, hardest[anchor]) if hardest is not None else rng.choice(others,
                                                                                                 positives.size)
        triplets += [(anchor, p, n) for p, n in zip(positives, chosen)]
    return np.asarray(triplets, dtype=np.int64).reshape(-1, 3)


def triplet_accuracy(embeddings: np.ndarray, triplets: np.ndarray) -> float:
    """Share of `triplets` (rows of anchor, positive, negative positions) with d(a, p) < d(a, n), euclidean."""
    e = np.asarray(embeddings, dtype=np.float64)
    a, p, n = e[triplets[:, 0]], e[triplets[:, 1]], e[triplets[:, 2]]
    return float(np.mean(np.linalg.norm(a - p, axis=1) < np.linalg.norm(a - n, axis=1))) if len(triplets) else \
        float("nan")
