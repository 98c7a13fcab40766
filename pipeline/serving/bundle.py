"""The bundle format (its one owner): a searchable collection, versioned, every version written whole.

    B/CURRENT                   names the live version ("v0003"); replaced atomically (temporary file + rename)
    B/versions/v0003/
        image_model/            SavedModel: embed_image_bytes (= serving_default), embed_pixels (serving_model.py)
        text_model/             SavedModel of CLIP backbones: embed_token_ids (= serving_default), embed_texts
        image_model.onnx        optional: the image network on decoded pixels (float32 [batch, S, S, 3], 0..255 →
                                unit embedding) for ONNX Runtime, kept only when it matched the SavedModel
                                (serving_model.write_image_onnx); search.py prefers it when onnxruntime imports
        index.faiss             FAISS index over embeddings.npy (row i = id i)
        embeddings.npy          float32 unit vectors, row i = items.parquet row i (add/remove re-embed nothing)
        items.parquet           id, label, label_name, path, text, group, split, and where the item's thumbnail
                                is: thumbnail_segment, thumbnail_offset, thumbnail_size
        thumbnails/<seg>.bin    the items' images at most `THUMBNAIL_SIDE` px, encoded JPEG/PNG bytes end to end;
                                immutable segments (one per export chunk or per add), shared between versions
        bundle.json             the card: model, metrics, index and its measured recall@10, export check,
                                history, and the sha256 and size of every other file
A version is written in `versions/.vNNNN.partial/`, checked against its card, renamed to `versions/vNNNN/`,
and only then named by CURRENT; so CURRENT never names a partial folder, and a writer killed midway leaves
a `.partial` folder that readers ignore and the next writer removes. Files a version shares with the previous
one (models, thumbnail segments) are hard links where the file system allows, else copies. Writers take
`B/.lock`; the last `KEEP_VERSIONS` versions are kept. A reader keeps working on the version it opened:
arrays are in memory and thumbnail segments held open, so a pruned folder's files stay readable to it.

Hashes: `open_bundle` checks the sha256 of every file it reads whole (card, items, embeddings, index, models:
read anyway, so the check costs about what reading does) and the size of each thumbnail segment; segments are
only read an image at a time, so hashing gigabytes of them on every server start is left to `verify_bundle`,
which every writer runs on the new version before publishing it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.core import atomic
from pipeline.core.errors import BundleError
from pipeline.serving.thumbnails import (
    THUMBNAIL_COLUMNS, THUMBNAIL_SIDE, THUMBNAILS, link_or_copy, thumbnails_of, write_thumbnails,
)

FORMAT = 1
CURRENT, VERSIONS, LOCK = "CURRENT", "versions", ".lock"
CARD, ITEMS, EMBEDDINGS, INDEX = "bundle.json", "items.parquet", "embeddings.npy", "index.faiss"
IMAGE_MODEL, TEXT_MODEL, IMAGE_ONNX = "image_model", "text_model", "image_model.onnx"
ITEM_COLUMNS = ("id", "label", "label_name", "path", "text", "group", "split")
KEEP_VERSIONS = 2
RECALL_K, RECALL_SAMPLE = 10, 1000
_VERSION = re.compile(r"v(\d{4,})")


@dataclass
class Bundle:
    root: Path
    version: str
    folder: Path
    card: dict
    items: object                 # pandas DataFrame, ITEM_COLUMNS + THUMBNAIL_COLUMNS, row i = embeddings row i
    index: object                 # faiss index
    embeddings: np.ndarray        # (n, dim) float32 unit rows
    segments: dict = field(default_factory=dict, repr=False)   # segment name -> open binary file

    @property
    def has_text(self) -> bool:
        return (self.folder / TEXT_MODEL).is_dir()

    @property
    def image_model_dir(self) -> Path:
        return self.folder / IMAGE_MODEL

    @property
    def image_onnx(self) -> Path | None:
        """The version's image_model.onnx, or None when it was not written."""
        path = self.folder / IMAGE_ONNX
        return path if path.is_file() else None

    @property
    def text_model_dir(self) -> Path | None:
        return self.folder / TEXT_MODEL if self.has_text else None

    def rows_of(self, ids: Iterable[str]) -> np.ndarray:
        """Row numbers of `ids`; BundleError naming the ids the bundle does not hold."""
        position = self.position
        ids = [str(i) for i in ids]
        unknown = [i for i in ids if i not in position]
        if unknown:
            raise BundleError(f"{len(unknown)} id(s) not in bundle {self.root} ({self.version}): "
                              f"{', '.join(map(repr, unknown[:5]))}{' ...' if len(unknown) > 5 else ''}")
        return np.array([position[i] for i in ids], dtype=np.int64)

    @cached_property
    def position(self) -> dict[str, int]:
        """id -> row."""
        return {item_id: row for row, item_id in enumerate(self.items["id"])}

    def thumbnail(self, item_id: str) -> bytes:
        """The encoded bytes (JPEG or PNG: `thumbnails.media_type`) of the bundle's own copy of the item's image."""
        row = int(self.rows_of([item_id])[0])
        segment, offset, size = (self.items[c].iat[row] for c in THUMBNAIL_COLUMNS)
        return os.pread(self.segments[segment].fileno(), int(size), int(offset))

    def close(self) -> None:
        for handle in self.segments.values():
            handle.close()
        self.segments.clear()


# --------------------------------------------------------------------------- reading


def current_version(root: str | Path) -> str | None:
    path = Path(root) / CURRENT
    try:
        name = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if not _VERSION.fullmatch(name):
        raise BundleError(f"{path} names {name!r}, not a bundle version")
    return name


def open_bundle(root: str | Path) -> Bundle:
    """The live version of the bundle at `root`, its files checked against its card."""
    import pandas as pd

    from pipeline.vectors.index import load_index

    root = Path(root)
    version = current_version(root)
    if version is None:
        raise BundleError(f"no bundle at {root} ({CURRENT} missing): write one with `python run.py export`")
    folder = root / VERSIONS / version
    card = read_card(folder)
    check_files(folder, card, hash_segments=False)
    items = pd.read_parquet(folder / ITEMS)
    embeddings = np.load(folder / EMBEDDINGS, allow_pickle=False).astype(np.float32, copy=False)
    index = load_index(folder / INDEX)
    if not (len(items) == len(embeddings) == index.ntotal == card.get("n_items")):
        raise BundleError(f"bundle {folder} is inconsistent: {len(items)} items, {len(embeddings)} embeddings, "
                          f"{index.ntotal} indexed, card says {card.get('n_items')}")
    segments = {name: open(folder / THUMBNAILS / name, "rb") for name in sorted(set(items["thumbnail_segment"]))}
    return Bundle(root, version, folder, card, items, index, embeddings, segments)


def read_card(folder: Path) -> dict:
    try:
        card = atomic.read_json(folder / CARD)
    except FileNotFoundError:
        raise BundleError(f"bundle version {folder} has no {CARD}") from None
    except ValueError as exc:
        raise BundleError(f"bundle card {folder / CARD} is not valid JSON ({exc})") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT or not isinstance(card.get("files"), dict):
        raise BundleError(f"{folder / CARD} is not a bundle card of format {FORMAT}")
    return card


def check_files(folder: Path, card: dict, hash_segments: bool = True) -> None:
    """Every file the card lists exists with its size and sha256 (thumbnail segments: size only, unless
    `hash_segments`); BundleError naming the first that does not."""
    for name, expected in card["files"].items():
        path = folder / name
        if not path.is_file():
            raise BundleError(f"bundle {folder} is corrupt: {name} is missing")
        if path.stat().st_size != expected["bytes"]:
            raise BundleError(f"bundle {folder} is corrupt: {name} has {path.stat().st_size} bytes, "
                              f"the card says {expected['bytes']}")
        if (hash_segments or not name.startswith(THUMBNAILS + "/")) and sha256_of(path) != expected["sha256"]:
            raise BundleError(f"bundle {folder} is corrupt: {name} does not match its sha256 in {CARD}")


def verify_bundle(root: str | Path) -> str:
    """Hash every file of the live version (thumbnail segments too); returns the version."""
    version = current_version(root)
    if version is None:
        raise BundleError(f"no bundle at {root} ({CURRENT} missing)")
    folder = Path(root) / VERSIONS / version
    check_files(folder, read_card(folder))
    return version


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2 ** 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- writing


@dataclass
class VersionContents:
    """What a new version holds; `thumbnails` yields the new items' encoded thumbnails, in row order, for
    rows whose thumbnail_segment is "" (rows that name a segment keep it, linked from `previous`)."""

    items: object
    embeddings: np.ndarray
    card: dict
    image_model: Path
    text_model: Path | None = None
    thumbnails: Iterable[bytes] = ()
    previous: Path | None = None
    index_kind: str = "auto"
    image_onnx: Path | None = None


def write_version(root: str | Path, contents: VersionContents, action: str) -> str:
    """Write, check and publish a new version; returns its name. The caller holds `writer_lock(root)`."""
    from pipeline.vectors.index import build_index, index_kind, measure_recall, save_index

    root = Path(root)
    versions = root / VERSIONS
    versions.mkdir(parents=True, exist_ok=True)
    for stale in versions.glob(".v*.partial"):
        shutil.rmtree(stale, ignore_errors=True)   # left by a writer that was killed; never named by CURRENT
    numbers = [int(m.group(1)) for p in versions.iterdir() if (m := _VERSION.fullmatch(p.name))]
    version = f"v{max(numbers, default=0) + 1:04d}"
    staging = versions / f".{version}.partial"
    staging.mkdir()
    try:
        items = contents.items.reset_index(drop=True).copy()
        embeddings = np.ascontiguousarray(contents.embeddings, dtype=np.float32)
        if len(items) != len(embeddings) or len(items) == 0:
            raise BundleError(f"a bundle needs one embedding per item and at least one item "
                              f"({len(items)} items, {len(embeddings)} embeddings)")
        if items["id"].duplicated().any():
            raise BundleError(f"duplicate ids: {items.loc[items['id'].duplicated(), 'id'].head(5).tolist()}")
        link_tree(contents.image_model, staging / IMAGE_MODEL)
        if contents.image_onnx is not None:
            link_or_copy(contents.image_onnx, staging / IMAGE_ONNX)
        if contents.text_model is not None:
            link_tree(contents.text_model, staging / TEXT_MODEL)
        write_thumbnails(staging / THUMBNAILS, items, contents.thumbnails, version,
                         None if contents.previous is None else contents.previous / THUMBNAILS)
        items.to_parquet(staging / ITEMS, index=False)
        atomic.save_npy(staging / EMBEDDINGS, embeddings)
        index = build_index(embeddings, contents.index_kind)
        save_index(index, staging / INDEX)
        card = {**contents.card, "format": FORMAT, "version": version, "n_items": len(items),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "embedding_dim": int(embeddings.shape[1]), "dtype": "float32",
                "index": {"type": index_kind(index), "requested": contents.index_kind,
                          f"recall@{RECALL_K}": measure_recall(index, embeddings, RECALL_K, RECALL_SAMPLE),
                          "recall_sample": min(RECALL_SAMPLE, len(items))},
                "thumbnails": {"max_side": THUMBNAIL_SIDE, "segments": sorted(set(items["thumbnail_segment"]))},
                "history": [*contents.card.get("history", []),
                            {"version": version, "action": action, "n_items": len(items)}]}
        card["files"] = {path.relative_to(staging).as_posix(): {"sha256": sha256_of(path),
                                                                "bytes": path.stat().st_size}
                         for path in sorted(staging.rglob("*")) if path.is_file()}
        atomic.write_json(staging / CARD, card)
        check_files(staging, read_card(staging))
        os.rename(staging, versions / version)
        atomic.fsync_path(versions)
        atomic.write_text(root / CURRENT, version + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    prune(root, keep=KEEP_VERSIONS)
    return version


@contextlib.contextmanager
def writer_lock(root: str | Path) -> Iterator[None]:
    """One writer at a time per bundle (an advisory lock on B/.lock, released if the writer dies)."""
    import fcntl

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prune(root: Path, keep: int) -> list[str]:
    """Remove all but the newest `keep` versions (never the current one)."""
    live = current_version(root)
    names = sorted((p.name for p in (root / VERSIONS).iterdir() if _VERSION.fullmatch(p.name)),
                   key=lambda n: int(n[1:]))
    removed = [n for n in names[:-keep] if n != live]
    for name in removed:
        shutil.rmtree(root / VERSIONS / name, ignore_errors=True)
    return removed


def link_tree(source: Path, destination: Path) -> None:
    """`source`'s files under `destination`: hard links where possible (same file system), else copies."""
    shutil.copytree(source, destination, copy_function=link_or_copy)




def new_items_table(metadata, labels_by_name: dict[str, int]):
    """Items rows (ITEM_COLUMNS, empty thumbnail columns) for new metadata rows: `id` required; label_name,
    text, group, path optional (""), split "added" unless given. A label name the bundle knows keeps its
    label number, a new one gets the next number, no name gets -1."""
    import pandas as pd

    frame = pd.DataFrame(metadata).astype(object)
    if "id" not in frame or frame["id"].eq("").any():
        raise BundleError("every new item needs an id")
    out = pd.DataFrame({"id": frame["id"].astype(str)})
    for column in ("label_name", "path", "text", "group"):
        out[column] = frame[column].fillna("").astype(str) if column in frame else ""
    out["split"] = frame["split"].fillna("added").astype(str) if "split" in frame else "added"
    known = dict(labels_by_name)
    for name in out["label_name"]:
        if name and name not in known:
            known[name] = max(known.values(), default=-1) + 1
    out["label"] = [known.get(name, -1) if name else -1 for name in out["label_name"]]
    out["thumbnail_segment"], out["thumbnail_offset"], out["thumbnail_size"] = "", 0, 0
    return out[[*ITEM_COLUMNS, *THUMBNAIL_COLUMNS]]


def publish_change(root: str | Path, change: Callable[[Bundle], tuple[VersionContents, str]]) -> str:
    """Under the writer lock, open the live version, derive the next one from it with `change`, publish it."""
    with writer_lock(root):
        bundle = open_bundle(root)
        try:
            contents, action = change(bundle)
            return write_version(root, contents, action)
        finally:
            bundle.close()


# --------------------------------------------------------------------------- the API


def write_bundle(root: str | Path, items, embeddings: np.ndarray, thumbnails: Iterable[bytes], image_model: Path,
                 card: dict, text_model: Path | None = None, index_kind: str = "auto",
                 image_onnx: Path | None = None) -> str:
    """A new version holding exactly this collection (export); `thumbnails` in items' row order; `image_onnx`:
    an image_model.onnx already checked against `image_model` (serving_model.write_image_onnx), if any."""
    import pandas as pd

    frame = pd.DataFrame(items).reset_index(drop=True)
    missing = [c for c in ITEM_COLUMNS if c not in frame]
    if missing:
        raise BundleError(f"the items lack column(s) {missing}")
    frame = frame[list(ITEM_COLUMNS)].copy()
    for column in ITEM_COLUMNS:
        frame[column] = frame[column].astype(np.int64 if column == "label" else str)
    frame["thumbnail_segment"], frame["thumbnail_offset"], frame["thumbnail_size"] = "", 0, 0
    contents = VersionContents(items=frame, embeddings=embeddings, card={**card, "history": []},
                               image_model=Path(image_model), text_model=text_model, thumbnails=thumbnails,
                               index_kind=index_kind, image_onnx=None if image_onnx is None else Path(image_onnx))
    with writer_lock(root):
        return write_version(root, contents, "export")


def add_items(root: str | Path, images, metadata, rejected: dict[str, str] | None = None,
              batch_size: int = 32) -> list[str]:
    """Embed `images` (encoded bytes) with the bundle's own image model and add them with `metadata` (one row
    per image: id; optional label_name, text, group, path, split); returns the ids added. An image that cannot
    be read is an error naming it, unless a `rejected` dict is given: then it is left out and its id and
    reason recorded there. An id the bundle already holds (or given twice) is an error; an error writes nothing.
    """
    import pandas as pd

    from pipeline.serving.serving_model import ImageEmbedder

    added: list[str] = []

    def change(bundle: Bundle):
        labels = {name: int(label) for name, label in zip(bundle.items["label_name"], bundle.items["label"]) if name}
        new = new_items_table(metadata, labels)
        if len(new) != len(images):
            raise BundleError(f"{len(images)} images but {len(new)} metadata rows")
        taken = new["id"][new["id"].isin(bundle.position) | new["id"].duplicated()].tolist()
        if taken:
            raise BundleError(f"id(s) already in bundle {bundle.root} or given twice: "
                              f"{', '.join(map(repr, taken[:5]))}{' ...' if len(taken) > 5 else ''}")
        vectors, errors, normalised = ImageEmbedder(bundle.image_model_dir).embed(images, batch_size)
        reasons = {new["id"].iat[p]: reason for p, reason in errors.items()}
        if reasons and (rejected is None or len(reasons) == len(new)):
            raise BundleError(f"{len(reasons)} of {len(new)} image(s) cannot be read: "
                              + "; ".join(f"{i}: {r}" for i, r in list(reasons.items())[:3]))
        if rejected is not None:
            rejected.update(reasons)
        keep = np.array([p not in errors for p in range(len(new))], dtype=bool)
        new = new[keep].reset_index(drop=True)
        added.extend(new["id"].tolist())
        items = pd.concat([bundle.items, new], ignore_index=True)
        thumbs = thumbnails_of([normalised[p] for p in np.flatnonzero(keep)], workers=1)
        return _next_contents(bundle, items, np.concatenate([bundle.embeddings, vectors[keep]]), thumbs), \
            f"add {len(new)}"

    publish_change(root, change)
    return added


def remove_items(root: str | Path, ids: Iterable[str]) -> str:
    """Remove items by id (nothing re-embedded); unknown ids are an error and nothing is written."""
    ids = [str(i) for i in ids]
    if not ids:
        raise BundleError("no ids to remove")

    def change(bundle: Bundle):
        drop = np.zeros(len(bundle.items), dtype=bool)
        drop[bundle.rows_of(ids)] = True
        if drop.all():
            raise BundleError(f"removing {len(ids)} id(s) would leave bundle {bundle.root} empty")
        return (_next_contents(bundle, bundle.items[~drop], bundle.embeddings[~drop], ()),
                f"remove {int(drop.sum())}")

    return publish_change(root, change)


def _next_contents(bundle: Bundle, items, embeddings, thumbnails) -> VersionContents:
    text = bundle.folder / TEXT_MODEL
    return VersionContents(items=items, embeddings=embeddings, card=_inherited(bundle.card),
                           image_model=bundle.folder / IMAGE_MODEL, text_model=text if text.is_dir() else None,
                           thumbnails=thumbnails, previous=bundle.folder,
                           index_kind=bundle.card.get("index", {}).get("requested", "auto"),
                           image_onnx=bundle.image_onnx)


def _inherited(card: dict) -> dict:
    """What a changed version keeps of its parent's card (the rest is computed anew)."""
    return {k: v for k, v in card.items() if k not in ("files", "version", "created", "n_items", "index")}
