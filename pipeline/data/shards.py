"""Phase 0's writers: TFRecord shards, the manifest and the rejects list of a dataset folder.

Every file is written to a temporary name and renamed, so a reader never sees half a file.
"""
from __future__ import annotations

import csv
import logging
import math
import random
from pathlib import Path

from pipeline.core.atomic import atomic_open, atomic_path, fsync_path
from pipeline.data.schema import SPLITS, ImageRecord, shard_filename, shard_glob
from pipeline.data.validate import Accepted

log = logging.getLogger("embedlab.ingest")

MANIFEST_COLUMNS = (
    "id", "split", "label", "label_name", "path", "sha256",
    "width", "height", "format", "reencoded", "text", "group", "role", "box",
)
REJECT_COLUMNS = ("path", "reason")


def shard_order(accepted: list[Accepted], assignment: dict[str, str], seed: int) -> dict[str, list[Accepted]]:
    """Records per split, each in a seeded shuffled order so that every shard mixes
    classes; sorting by id first makes the order independent of the input order."""
    by_split: dict[str, list[Accepted]] = {}
    for split in SPLITS:
        members = sorted((a for a in accepted if assignment[a.item.id] == split), key=lambda a: a.item.id)
        random.Random(f"{seed}:shards:{split}").shuffle(members)
        by_split[split] = members
    return by_split


def image_record(a: Accepted, label_index: dict[str, int], spill) -> ImageRecord:
    spill.seek(a.offset)
    item = a.item
    return ImageRecord(
        id=item.id, image=spill.read(a.length), format=a.format,
        label=label_index[item.label_name], label_name=item.label_name, path=item.path,
        height=a.height, width=a.width, sha256=a.sha256, text=item.text, group=item.group,
        role=item.role, box=a.box,
    )


def write_shards(out: Path, by_split: dict[str, list[Accepted]], label_index: dict[str, int],
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
                        writer.write(serialize(image_record(a, label_index, spill)))
                fsync_path(tmp)  # TFRecordWriter flushes but does not fsync
            shards[split].append(name)
    return shards




def write_manifest(path: Path, by_split: dict[str, list[Accepted]], label_index: dict[str, int]) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(MANIFEST_COLUMNS)
        for split, members in by_split.items():
            for a in members:
                item = a.item
                writer.writerow([
                    item.id, split, label_index[item.label_name], item.label_name, item.path,
                    a.sha256, a.width, a.height, a.format, a.reencoded, item.text, item.group, item.role, a.box,
                ])


def write_rejects(path: Path, rejects: list[tuple[str, str]]) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(REJECT_COLUMNS)
        writer.writerows(rejects)


def remove_stale_shards(out: Path, shards: dict[str, list[str]]) -> None:
    """Shards of an earlier build with other shard counts would be picked up by a
    reader globbing `<split>-*-of-*.tfrecord`; remove them."""
    current = {name for names in shards.values() for name in names}
    for split in SPLITS:
        for old in out.glob(shard_glob(split)):
            if old.name not in current:
                old.unlink(missing_ok=True)
                log.debug("removed stale shard %s", old)
