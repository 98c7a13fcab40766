"""Hard negatives refreshed from the model being trained (`train.hard_negatives: {source: current, refresh_every: N}`).

Mined once, the hard negatives are those the frozen baseline confuses; as the model learns, it stops confusing
many of them and confuses others. Here the first N epochs use the baseline's table; then, at the end of every
N-th epoch, the training items are embedded with the model as it is (the head on the cached features, or the
fine-tuned network on the images), ranked again (training/mining.py: exact and chunked, FAISS for large sets;
same key or group excluded; optionally mixed with random negatives), and the new table builds the batches of
the next N epochs (sampler.refreshed_batch_indices: table t's batches come from a stream seeded by t alone).

The table in force is part of every committed epoch (training/checkpoints.py EpochBackup `extras`): the backup
holds `hard_negatives_TTT.npy` and state.json names it with the refresh log, so a resumed run draws the batches
an uninterrupted one would, and a crash between a refresh and its commit re-mines the same table from the same
committed weights (the exact ranking is bit-for-bit reproducible). Each refresh logs and records (training.json
"hard_negatives" "refreshes") its embedding and mining time and how many of the table's negatives changed.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from collections.abc import Callable

import keras
import numpy as np

from pipeline.config import TrainConfig
from pipeline.core import atomic
from pipeline.training.checkpoints import read_state
from pipeline.training.mining import changed_negatives, mine_hard_negatives

log = logging.getLogger("embedlab.train")

STATE_KEY = "hard_negatives"
TABLE_FILE = "hard_negatives_{number:03d}.npy"


def refreshing(settings: TrainConfig) -> bool:
    """Whether this training refreshes its hard-negative table from the model being trained."""
    return settings.hard_negative_share > 0 and settings.hard_negatives.source == "current"


def group_codes(items, rows: np.ndarray) -> np.ndarray | None:
    """int per row of `rows`: its group's code, -1 without a group; None when the items have no groups."""
    if "group" not in items:
        return None
    groups = items["group"].fillna("").astype(str).to_numpy()[np.asarray(rows)]
    if not (groups != "").any():
        return None
    codes = np.unique(groups, return_inverse=True)[1].astype(np.int64)
    return np.where(groups != "", codes, -1)


class NegativeTables:
    """The hard-negative tables of one fit, by number (table t builds the batches of epochs [tN, (t+1)N)).

    The batch generator runs on a tf.data thread and may ask for a table the main thread has not mined yet
    (prefetching runs ahead of the epoch's end): `table_for` waits for it, and gets None once the fit is over
    (`close`), which ends the batch stream.
    """

    def __init__(self, number: int, table: np.ndarray):
        self._tables = {int(number): np.asarray(table, dtype=np.int64)}
        self._condition = threading.Condition()
        self._closed = False

    def publish(self, number: int, table: np.ndarray) -> None:
        with self._condition:
            self._tables[int(number)] = np.asarray(table, dtype=np.int64)
            for old in [n for n in self._tables if n < number - 1]:
                del self._tables[old]   # the stream never goes back
            self._condition.notify_all()

    def latest(self) -> tuple[int, np.ndarray]:
        with self._condition:
            number = max(self._tables)
            return number, self._tables[number]

    def table_for(self, number: int) -> np.ndarray | None:
        with self._condition:
            while number not in self._tables and not self._closed:
                self._condition.wait(timeout=1.0)
            return self._tables.get(number)

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()


class HardNegativeRefresh(keras.callbacks.Callback):
    """Re-mines the hard-negative table at the end of every `refresh_every`-th epoch (not after the last one,
    nor when training stops there), and hands the table in force to EpochBackup (`commit`).

    Must come after EarlyStopping (which says whether training goes on) and before EpochBackup (which commits
    the table with the epoch).
    """

    def __init__(self, tables: NegativeTables, embed: Callable[[], np.ndarray], keys: np.ndarray,
                 groups: np.ndarray | None, settings: TrainConfig, refreshes: list | None = None):
        super().__init__()
        self.tables, self.embed = tables, embed
        self.keys, self.groups = np.asarray(keys), groups
        self.every = int(settings.hard_negatives.refresh_every)
        self.random_share = float(settings.hard_negatives.random_share)
        self.per_item = int(settings.hard_negatives_per_item)
        self.seed = int(settings.seed)
        self.refreshes: list[dict] = list(refreshes or [])

    def on_epoch_end(self, epoch, logs=None):
        completed = epoch + 1
        loss = (logs or {}).get("loss")
        if completed % self.every or completed >= (self.params or {}).get("epochs", completed + 1) \
                or self.model.stop_training or (loss is not None and not np.isfinite(loss)):
            return
        self.refresh(completed)

    def refresh(self, completed: int) -> dict:
        number = completed // self.every
        started = time.perf_counter()
        embeddings = np.asarray(self.embed(), dtype=np.float32)
        embedded = time.perf_counter()
        table, info = mine_hard_negatives(embeddings, self.keys, self.per_item, groups=self.groups,
                                          random_share=self.random_share, seed=[self.seed, number])
        mined = time.perf_counter()
        _, previous = self.tables.latest()
        changed = changed_negatives(previous, table)
        listed = max(int((table >= 0).sum()), 1)
        entry = {"epoch": completed, "table": number, "method": info["method"], "n_random": info["n_random"],
                 "embed_seconds": embedded - started, "mine_seconds": mined - embedded, "seconds": mined - started,
                 "changed": changed, "changed_share": changed / listed}
        self.refreshes.append(entry)
        self.tables.publish(number, table)
        log.info("phase 3: hard negatives refreshed after epoch %d (table %d): %d items embedded in %.1f s, ranked "
                 "(%s) in %.1f s; %d of %d listed negatives changed (%.0f %%)", completed, number, len(table),
                 entry["embed_seconds"], info["method"], entry["mine_seconds"], changed, listed,
                 100 * entry["changed_share"])
        return entry

    def on_train_end(self, logs=None):
        self.tables.close()

    # ----------------------------------------------------------------- committed state (EpochBackup extras)

    def commit(self, backup_dir: Path) -> dict:
        """Writes the table in force into `backup_dir` (once per table) and returns what state.json records."""
        number, table = self.tables.latest()
        name = TABLE_FILE.format(number=number)
        if not (backup_dir / name).is_file():
            atomic.save_npy(backup_dir / name, table.astype(np.int32 if len(table) < 2**31 else np.int64))
        return {"table": number, "file": name, "refreshes": [dict(entry) for entry in self.refreshes]}

    def summary(self) -> dict:
        return {"source": "current", "refresh_every": self.every, "random_share": self.random_share,
                "refreshes": self.refreshes, "n_refreshes": len(self.refreshes),
                "refresh_seconds": float(sum(entry["seconds"] for entry in self.refreshes))}


def committed_table(backup_dir: Path, epoch: int) -> tuple[int, np.ndarray, list]:
    """(table number, table, refresh log) committed with `epoch` in `backup_dir` (its latest state, or the one
    before it when the workers of a cluster agreed to resume from that)."""
    state = read_state(backup_dir)
    if state is not None and state["epoch"] != epoch:
        state = state.get("previous")
    extra = ((state or {}).get("extras") or {}).get(STATE_KEY)
    if not extra:
        raise RuntimeError(f"{backup_dir}: the committed epoch {epoch} holds no hard-negative table; delete the "
                           "folder's backup/ (or rerun with --force) to train from the start")
    return int(extra["table"]), np.load(backup_dir / extra["file"]).astype(np.int64), list(extra["refreshes"])


def start_refresh(settings: TrainConfig, backup_dir: Path, resume_epoch: int, initial: np.ndarray, keys, groups,
                  embed: Callable[[], np.ndarray]) -> HardNegativeRefresh | None:
    """The refresh callback of a fit (None when the table is mined once): from the baseline's table
    `initial`, or from the table committed with `resume_epoch`."""
    if not refreshing(settings):
        return None
    number, table, refreshes = 0, initial, []
    if resume_epoch:
        number, table, refreshes = committed_table(backup_dir, resume_epoch)
        log.info("phase 3: resuming with hard-negative table %d (%d refreshes so far)", number, len(refreshes))
    return HardNegativeRefresh(NegativeTables(number, table), embed, keys, groups, settings, refreshes)
