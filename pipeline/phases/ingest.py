"""Phase 0: images -> validated, de-duplicated, split and sharded TFRecords.

    tfrecords/<dataset>/
        <split>-NNNNN-of-MMMMM.tfrecord   records in a seeded shuffled order per split
        manifest.csv                      one row per record, in shard order
        rejects.csv                       path, reason
        dataset.json                      written last: its presence means "complete"

The phase is idempotent: dataset.json carries a fingerprint of the data settings and
of the source listing; a second run with the same fingerprint finds every shard
and returns at once.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
import tempfile
from collections import Counter, defaultdict, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

from tqdm import tqdm

from pipeline.core.errors import IngestError
from pipeline.data import images
from pipeline.core.atomic import atomic_open, atomic_path, read_json, write_json
from pipeline.config import DataConfig, RunConfig
from pipeline.core.run_dir import RunDir, dataset_name
from pipeline.data.schema import SCHEMA_VERSION, SPLITS, ImageRecord, shard_filename, shard_glob
from pipeline.data.sources import SourceError, SourceItem, discover, load_builtin, source_kind
from pipeline.data.splits import SplitItem, SplitResult, assign_splits

log = logging.getLogger("embedlab.ingest")

DATASET_JSON = "dataset.json"
MANIFEST_CSV = "manifest.csv"
REJECTS_CSV = "rejects.csv"
MANIFEST_COLUMNS = (
    "id", "split", "label", "label_name", "path", "sha256",
    "width", "height", "format", "reencoded", "text", "group",
)
REJECT_COLUMNS = ("path", "reason")
# Bump when the way images are normalised changes, so old datasets get rebuilt.
INGEST_VERSION = 1
# Below this many images a worker pool costs more to start than it saves.
MIN_ITEMS_FOR_POOL = 64




@dataclass(frozen=True)
class _Accepted:
    item: SourceItem
    sha256: str
    format: str
    width: int
    height: int
    reencoded: bool
    offset: int     # where the encoded bytes sit in the spill file
    length: int


# --------------------------------------------------------------------------- entry point


def run_ingest(config: RunConfig, force: bool = False) -> Path:
    """Build `RunDir(config).dataset_dir` from `config.data`; return that folder."""
    data = config.data
    out = RunDir(config).dataset_dir
    _check_settings(data)

    try:
        kind = source_kind(data.source)
        # Built-ins are fingerprinted by name, so an up-to-date check never loads them.
        listed = None if kind == "builtin" else discover(data)
    except SourceError as exc:
        raise IngestError(str(exc)) from exc
    fingerprint = compute_fingerprint(data, listed)
    if not force and is_up_to_date(out, fingerprint):
        log.info("phase 0: %s is up to date (use --force to rebuild)", out)
        return out

    if listed is None:
        try:
            listed = load_builtin(data.source)
        except SourceError as exc:
            raise IngestError(str(exc)) from exc

    rejects = [(item.path or item.id, item.reject) for item in listed if item.reject]
    candidates = [item for item in listed if not item.reject]
    if not candidates:
        detail = f"; all {len(rejects)} file(s) were refused, e.g. {_examples(rejects)}" if rejects else ""
        raise IngestError(f"no image files found in source {data.source!r}{detail}")

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out, prefix=".ingest-spill-") as spill:
        accepted, decode_rejects = _validate(candidates, data, spill)
        rejects += decode_rejects
        rejects.sort()
        if not accepted:
            raise IngestError(
                f"no valid image in source {data.source!r}: all {len(rejects)} file(s) were "
                f"rejected, e.g. {_examples(rejects)}"
            )

        classes = sorted({a.item.label_name for a in accepted})
        label_index = {name: i for i, name in enumerate(classes)}
        try:
            result = assign_splits(
                [SplitItem(a.item.id, a.item.label_name, a.sha256, a.item.group) for a in accepted],
                method=data.split, ratios=data.ratios, seed=data.seed, class_order=data.class_order,
            )
        except ValueError as exc:
            raise IngestError(str(exc)) from exc

        # Invalidate before the first shard is replaced: until the new dataset.json
        # lands, readers see an incomplete dataset rather than a mix of two builds.
        (out / DATASET_JSON).unlink(missing_ok=True)
        by_split = _shard_order(accepted, result.assignment, data.seed)
        shards = _write_shards(out, by_split, label_index, data.shard_size, spill)

    _write_manifest(out / MANIFEST_CSV, by_split, label_index)
    _write_rejects(out / REJECTS_CSV, rejects)

    summary = _summary(data, kind, fingerprint, classes, accepted, rejects, result, shards)
    write_json(out / DATASET_JSON, summary)
    _remove_stale_shards(out, shards)
    _log_summary(out, summary, rejects)
    return out


def _summary(data: DataConfig, kind: str, fingerprint: str, classes: list[str], accepted: list[_Accepted],
             rejects: list[tuple[str, str]], result: SplitResult, shards: dict[str, list[str]]) -> dict:
    """The content of dataset.json."""
    counts = {s: {c: 0 for c in classes} for s in SPLITS}
    for a in accepted:
        counts[result.assignment[a.item.id]][a.item.label_name] += 1
    return {
        "schema_version": SCHEMA_VERSION,
        "name": dataset_name(data),
        "source": data.source,
        "source_kind": kind,
        "split": data.split,
        "class_order": data.class_order,
        "ratios": list(data.ratios),
        "seed": data.seed,
        "label_from": data.label_from,
        "max_side": data.max_side,
        "limit_per_class": data.limit_per_class,
        "shard_size": data.shard_size,
        "classes": classes,
        "counts": counts,
        "totals": {s: sum(counts[s].values()) for s in SPLITS},
        "n_images": len(accepted),
        "n_rejects": len(rejects),
        "n_reencoded": sum(a.reencoded for a in accepted),
        "duplicate_groups": result.duplicate_groups,
        "conflicting_duplicates": result.conflicting_duplicates,
        "single_image_classes": result.single_image_classes,
        "classes_without_test_items": result.classes_without_test_items,
        "shards": shards,
        "fingerprint": fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- idempotency


def compute_fingerprint(data: DataConfig, listed: Sequence[SourceItem] | None) -> str:
    """Hash of every data setting but `workers`, plus the source listing (ids, paths,
    labels, sizes, mtimes; a built-in by its name alone)."""
    h = hashlib.sha256()
    settings = {k: v for k, v in dataclasses.asdict(data).items() if k != "workers"}
    h.update(json.dumps(
        {"settings": settings, "schema": SCHEMA_VERSION, "ingest": INGEST_VERSION}, sort_keys=True,
    ).encode())
    if listed is None:
        h.update(f"builtin:{data.source}".encode())
    else:
        for item in listed:
            fields = (item.id, item.path, item.label_name, item.text, item.group,
                      item.reject, item.size, item.mtime_ns)
            h.update(json.dumps(fields).encode() + b"\n")
    return h.hexdigest()


def is_up_to_date(out: Path, fingerprint: str) -> bool:
    try:
        summary = read_json(out / DATASET_JSON)
    except (OSError, ValueError):
        return False
    if not isinstance(summary, dict) or summary.get("fingerprint") != fingerprint:
        return False
    shard_names = [name for names in summary.get("shards", {}).values() for name in names]
    needed = [MANIFEST_CSV, REJECTS_CSV, *shard_names]
    return all((out / name).is_file() for name in needed)


# --------------------------------------------------------------------------- validation


def _check_settings(data: DataConfig) -> None:
    problems = []
    if data.shard_size < 1:
        problems.append(f"shard_size must be at least 1, got {data.shard_size}")
    if data.limit_per_class < 0:
        problems.append(f"limit_per_class must be >= 0, got {data.limit_per_class}")
    if data.max_side < 0:
        problems.append(f"max_side must be >= 0, got {data.max_side}")
    if data.workers < 0:
        problems.append(f"workers must be >= 0, got {data.workers}")
    if problems:
        raise IngestError("; ".join(problems))


def _worker_count(data: DataConfig) -> int:
    if data.workers:
        return data.workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class _Validator:
    """Runs images.normalize over items, in worker processes when it pays off.

    The executor starts lazily and is reused across the refill rounds of
    limit_per_class. "spawn" rather than fork: the parent may have TensorFlow (and
    its threads) loaded, and forking a threaded process can deadlock the child.
    ProcessPoolExecutor rather than Pool because it notices workers that die (e.g.
    spawn cannot re-import a `python -` script), where Pool would respawn them
    forever; then the remaining items are done in this process.
    """

    def __init__(self, workers: int, max_side: int) -> None:
        self.workers = workers
        self.fn = functools.partial(images.normalize, max_side=max_side)
        self.executor: ProcessPoolExecutor | None = None

    def __call__(self, items: Sequence[SourceItem]) -> Iterator[images.ImageResult]:
        payloads = [item.payload for item in items]
        bar = tqdm(total=len(items), desc="phase 0: validating", unit="img", disable=None)
        done = 0
        try:
            if self.workers > 1 and len(items) >= MIN_ITEMS_FOR_POOL:
                if self.executor is None:
                    self.executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
                chunk = max(1, min(256, len(items) // (self.workers * 8)))
                try:
                    # map (not as_completed): results come back in input order.
                    for result in self.executor.map(self.fn, payloads, chunksize=chunk):
                        done += 1
                        bar.update()
                        yield result
                except BrokenProcessPool as exc:
                    log.warning("phase 0: worker processes failed (%s); validating in this process", exc)
                    self.close()
                    self.workers = 1
            for payload in payloads[done:]:
                result = self.fn(payload)
                bar.update()
                yield result
        finally:
            bar.close()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None


def _validate(candidates: list[SourceItem], data: DataConfig, spill) -> tuple[list[_Accepted], list[tuple[str, str]]]:
    """Decode every candidate (or, with limit_per_class, a seeded sample per class,
    topped up from the same shuffled order when sampled images turn out bad)."""
    accepted: list[_Accepted] = []
    rejects: list[tuple[str, str]] = []
    validator = _Validator(_worker_count(data), data.max_side)

    def run(batch: list[SourceItem]) -> Counter:
        good = Counter()
        for item, res in zip(batch, validator(batch)):
            if not res.ok:
                rejects.append((item.path or item.id, res.reason))
                continue
            offset = spill.tell()
            spill.write(res.data)
            accepted.append(_Accepted(
                item, res.sha256, res.format, res.width, res.height, res.reencoded, offset, len(res.data),
            ))
            good[item.label_name] += 1
        return good

    try:
        if data.limit_per_class <= 0:
            run(candidates)
        else:
            by_class: dict[str, list[SourceItem]] = defaultdict(list)
            for item in candidates:
                by_class[item.label_name].append(item)
            queues = {}
            for label, members in by_class.items():
                members.sort(key=lambda item: item.id)
                random.Random(f"{data.seed}:limit:{label}").shuffle(members)
                queues[label] = deque(members)
            need = {label: data.limit_per_class for label in queues}
            while True:
                batch = [
                    queues[label].popleft()
                    for label in sorted(queues)
                    for _ in range(min(need[label], len(queues[label])))
                ]
                if not batch:
                    break
                for label, n in run(batch).items():
                    need[label] -= n
    finally:
        validator.close()
    return accepted, rejects


# --------------------------------------------------------------------------- writing


def _shard_order(accepted: list[_Accepted], assignment: dict[str, str], seed: int) -> dict[str, list[_Accepted]]:
    """Records per split, each in a seeded shuffled order so that every shard mixes
    classes; sorting by id first makes the order independent of the input order."""
    by_split: dict[str, list[_Accepted]] = {}
    for split in SPLITS:
        members = sorted((a for a in accepted if assignment[a.item.id] == split), key=lambda a: a.item.id)
        random.Random(f"{seed}:shards:{split}").shuffle(members)
        by_split[split] = members
    return by_split


def _record(a: _Accepted, label_index: dict[str, int], spill) -> ImageRecord:
    spill.seek(a.offset)
    item = a.item
    return ImageRecord(
        id=item.id, image=spill.read(a.length), format=a.format,
        label=label_index[item.label_name], label_name=item.label_name, path=item.path,
        height=a.height, width=a.width, sha256=a.sha256, text=item.text, group=item.group,
    )


def _write_shards(out: Path, by_split: dict[str, list[_Accepted]], label_index: dict[str, int],
                  shard_size: int, spill) -> dict[str, list[str]]:
    """Each split in ceil(n / shard_size) shards of near-equal size (never above
    shard_size); every shard written to a temporary name, then renamed."""
    import tensorflow as tf

    from pipeline.data.schema import serialize

    shards: dict[str, list[str]] = {}
    for split, members in by_split.items():
        count = math.ceil(len(members) / shard_size)
        shards[split] = []
        for index in range(count):
            name = shard_filename(split, index, count)
            start, stop = len(members) * index // count, len(members) * (index + 1) // count
            with atomic_path(out / name) as tmp:
                with tf.io.TFRecordWriter(str(tmp)) as writer:
                    for a in members[start:stop]:
                        writer.write(serialize(_record(a, label_index, spill)))
                _fsync(tmp)
            shards[split].append(name)
    return shards


def _fsync(path: Path) -> None:
    # TFRecordWriter flushes but does not fsync; atomic_path's rename needs the data on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(path: Path, by_split: dict[str, list[_Accepted]], label_index: dict[str, int]) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(MANIFEST_COLUMNS)
        for split, members in by_split.items():
            for a in members:
                item = a.item
                writer.writerow([
                    item.id, split, label_index[item.label_name], item.label_name, item.path,
                    a.sha256, a.width, a.height, a.format, a.reencoded, item.text, item.group,
                ])


def _write_rejects(path: Path, rejects: list[tuple[str, str]]) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(REJECT_COLUMNS)
        writer.writerows(rejects)


def _remove_stale_shards(out: Path, shards: dict[str, list[str]]) -> None:
    """Shards of an earlier build with other shard counts would be picked up by a
    reader globbing `<split>-*-of-*.tfrecord`; remove them."""
    current = {name for names in shards.values() for name in names}
    for split in SPLITS:
        for old in out.glob(shard_glob(split)):
            if old.name not in current:
                old.unlink(missing_ok=True)
                log.debug("removed stale shard %s", old)


def _examples(rejects: list[tuple[str, str]], n: int = 3) -> str:
    return "; ".join(f"{path}: {reason}" for path, reason in rejects[:n])


def _log_summary(out: Path, summary: dict, rejects: list[tuple[str, str]]) -> None:
    totals = summary["totals"]
    n_shards = sum(len(v) for v in summary["shards"].values())
    log.info(
        "phase 0: %d images, %d classes -> %s (train %d / val %d / test %d, %d shard(s), %d re-encoded)",
        summary["n_images"], len(summary["classes"]), out,
        totals["train"], totals["val"], totals["test"], n_shards, summary["n_reencoded"],
    )
    if rejects:
        reasons = Counter(reason for _, reason in rejects).most_common(5)
        log.warning(
            "phase 0: %d rejected (%s); see %s", len(rejects),
            ", ".join(f"{reason}: {n}" for reason, n in reasons), out / REJECTS_CSV,
        )
    if summary["duplicate_groups"]:
        log.info("phase 0: %d groups of exact duplicates (each kept within one split)",
                 len(summary["duplicate_groups"]))
    if summary["conflicting_duplicates"]:
        log.warning("phase 0: %d duplicate groups carry different labels, e.g. %s",
                    len(summary["conflicting_duplicates"]), summary["conflicting_duplicates"][0])
    if summary["single_image_classes"]:
        log.warning("phase 0: single-image classes: %s", summary["single_image_classes"])
    if summary["classes_without_test_items"]:
        log.warning("phase 0: classes without test items: %s", summary["classes_without_test_items"])
