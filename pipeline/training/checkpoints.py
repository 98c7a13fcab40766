"""Resumable training state, committed atomically once per epoch.

Keras's BackupAndRestore writes `latest.weights.h5` and then its metadata, neither
atomically: a run killed in between leaves a backup that either fails to load on every
later attempt or resumes trained weights as if they were epoch 0. And a best-model
checkpoint written by ModelCheckpoint can hold an epoch that the resume then redoes.

Here every epoch end writes whole new files under fresh names and then commits them
all at once by atomically replacing `state.json`:

    backup/epoch_NNN.weights.h5        model and optimizer after epoch NNN (the last two are kept)
    backup/best_epoch_NNN.weights.h5   the best epoch so far by the monitored score
    backup/state.json                  {"epoch", "weights", "previous", "best": {"epoch", "value", "weights"},
                                        "finished", "extras"}

`extras`: other state that belongs to an epoch, committed with it (e.g. the hard-negative table in force,
training/refresh.py): each provider writes its files into the folder and returns a record naming them
("file"), kept in state.json (and in "previous") so the files are kept and found on resume.

A file that `state.json` does not name belongs to an epoch that was never committed
and is deleted on resume. When the fit ends normally, the best weights are published
as `best_path` and the state is marked finished; the folder stays until the caller
has published its results (pipeline/train.py `finish_training`), so a run that dies
while saving or exporting resumes there, without training again. A diverged fit
(a non-finite loss) drops the folder: there is nothing to resume.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
from pathlib import Path

import keras

from pipeline.core import atomic

STATE_FILE = "state.json"


class BackupError(RuntimeError):
    """A backup folder whose committed state cannot be used."""


def read_state(backup_dir: Path) -> dict | None:
    """The committed state of `backup_dir`, or None when it holds none that is usable.

    Usable means: state.json parses, has an integer epoch >= 1, and every weights
    file it names exists. Anything else (no folder, an old BackupAndRestore layout,
    a hand-edited file) is not resumable.
    """
    try:
        state = atomic.read_json(backup_dir / STATE_FILE)
        epoch = state["epoch"]
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
            return None
        for name in _named_files(state):
            if not (backup_dir / name).is_file():
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state


def _named_files(state: dict) -> list[str]:
    names = [state["weights"]]
    if state.get("previous"):
        names.append(state["previous"]["weights"])
        names.extend(_extra_files(state["previous"]))
    if state.get("best"):
        names.append(state["best"]["weights"])
    return names + _extra_files(state)


def _extra_files(state: dict) -> list[str]:
    return [record["file"] for record in (state.get("extras") or {}).values() if record.get("file")]


class EpochBackup(keras.callbacks.Callback):
    """Saves and restores the training state; replaces BackupAndRestore and the best-model checkpoint.

    Must come after every callback that changes what is saved or read at epoch end
    (the validation scores in the logs, ReduceLROnPlateau's learning rate, the CSV log).
    `resume_from` picks which committed epoch to restore (the latest or the one before
    it, so that the workers of a cluster can agree on one); None restores the latest.
    """

    def __init__(self, backup_dir: str | Path, best_path: str | Path, monitor: str, resume_from: int | None = None,
                 finished: bool | None = None, extras: dict | None = None):
        super().__init__()
        self.backup_dir = Path(backup_dir)
        self.best_path = Path(best_path)
        self.monitor = monitor
        self.resume_from = resume_from
        # Whether the restored fit had already ended (then no epoch runs); None: as the state says.
        self.finished = finished
        # name -> provider with commit(backup_dir) -> record (see the module docstring)
        self.extras = dict(extras or {})
        self.state: dict | None = None
        self._diverged = False

    # ----------------------------------------------------------------- restore

    def on_train_begin(self, logs=None):
        state = read_state(self.backup_dir)
        if state is None and self.resume_from is not None:
            # The caller skips batches and trims the history for this resume: never train afresh under it.
            raise BackupError(f"{self.backup_dir}: no committed backup to resume after epoch {self.resume_from}")
        if state is not None and self.resume_from is not None and self.resume_from != state["epoch"]:
            previous = state.get("previous")
            if not previous or previous["epoch"] != self.resume_from:
                raise BackupError(f"{self.backup_dir}: epoch {self.resume_from} is not among the committed "
                                  f"backups (latest {state['epoch']})")
            state = {"epoch": previous["epoch"], "weights": previous["weights"], "previous": None,
                     "best": previous.get("best"), "finished": False, "extras": previous.get("extras") or {}}
            if state["best"] and not (self.backup_dir / state["best"]["weights"]).is_file():
                raise BackupError(f"{self.backup_dir}: the best weights of epoch {previous['epoch']} are missing")
            atomic.write_json(self.backup_dir / STATE_FILE, state)   # committed before the newer files go
        self.state = state
        self._sweep()
        if state is None:
            return
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(self.backup_dir / state["weights"])
        # Read by Model.fit after on_train_begin, as for BackupAndRestore. A finished fit
        # (early stopping included) starts at its last epoch: no epoch runs again.
        finished = state.get("finished", False) if self.finished is None else self.finished
        epochs = (self.params or {}).get("epochs", 0)
        self.model._initial_epoch = max(state["epoch"], epochs) if finished else state["epoch"]

    # ----------------------------------------------------------------- commit

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(loss):
            self._diverged = True
            return   # a diverged epoch is never committed
        completed = epoch + 1
        self.backup_dir.mkdir(parents=True, exist_ok=True)
        weights = f"epoch_{completed:03d}.weights.h5"
        self._save(weights)
        best = (self.state or {}).get("best")
        score = logs.get(self.monitor)
        if score is not None and math.isfinite(score) and (best is None or score > best["value"]):
            best = {"epoch": completed, "value": float(score), "weights": f"best_epoch_{completed:03d}.weights.h5"}
            self._save(best["weights"])
        previous = None
        if self.state is not None:
            previous = {"epoch": self.state["epoch"], "weights": self.state["weights"], "best": self.state.get("best"),
                        "extras": self.state.get("extras") or {}}
        # The last epoch, or early stopping's (it runs earlier in the list): committed as the
        # end of the fit, so a kill before on_train_end does not train on past the stop.
        finished = bool(self.model.stop_training) or completed >= (self.params or {}).get("epochs", completed + 1)
        extras = {name: provider.commit(self.backup_dir) for name, provider in self.extras.items()}
        self.state = {"epoch": completed, "weights": weights, "previous": previous, "best": best,
                      "finished": finished, "extras": extras}
        atomic.write_json(self.backup_dir / STATE_FILE, self.state)   # the commit
        self._sweep()

    def on_train_end(self, logs=None):
        if self._diverged or self.state is None:
            shutil.rmtree(self.backup_dir, ignore_errors=True)
            return
        best = self.state.get("best")
        if best is not None:
            with atomic.atomic_path(self.best_path) as tmp:
                shutil.copyfile(self.backup_dir / best["weights"], tmp)
        self.state = {**self.state, "finished": True}
        atomic.write_json(self.backup_dir / STATE_FILE, self.state)

    # ----------------------------------------------------------------- files

    def _save(self, name: str) -> None:
        # Keras insists on the ".weights.h5" ending, so the temporary name keeps it.
        tmp = self.backup_dir / f".partial-{name}"
        self.model.save_weights(tmp, overwrite=True)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.backup_dir / name)

    def _sweep(self) -> None:
        """Delete what the committed state does not name: leftovers of uncommitted epochs."""
        if not self.backup_dir.is_dir():
            return
        keep = {STATE_FILE}
        if self.state:
            keep.update(_named_files(self.state))
            previous_best = (self.state.get("previous") or {}).get("best")
            if previous_best:
                keep.add(previous_best["weights"])   # what a roll-back to the previous epoch needs
        for path in self.backup_dir.iterdir():
            if path.name not in keep:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink() if path.is_file() else shutil.rmtree(path)
