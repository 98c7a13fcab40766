"""Discover what to ingest: a class-per-folder tree, a CSV/Parquet manifest or a built-in.

Discovery only lists; nothing is decoded here. Items that can be refused without
opening them (wrong file type, no class, empty label, missing file) come back with
`reject` set so that they end up in rejects.csv next to the decoding failures.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from pipeline.config import DataConfig
from pipeline.core.run_dir import BUILTIN_DATASETS
from pipeline.data.boxes import BOX_COLUMNS, Box, BoxError, box_item_id, parse_box

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MANIFEST_EXTENSIONS = (".csv", ".parquet")
MANIFEST_REQUIRED = ("path", "label")
MANIFEST_OPTIONAL = ("text", "group", "id", "role", *BOX_COLUMNS)

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
FASHION_MNIST_FILES = (
    ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class SourceError(ValueError):
    """The source itself is unusable (not found, malformed manifest, no built-in data)."""


@dataclass(frozen=True)
class SourceItem:
    id: str                         # unique within the source
    path: str                       # a file path, or "builtin:<name>/<index>"
    label_name: str
    file: str | None = None         # what to read; None for in-memory items
    array: np.ndarray | None = None
    text: str = ""
    group: str = ""
    # What the item is within its group: "original", "generated", or free text ("moderate", "radical").
    role: str = ""
    reject: str = ""                # non-empty: refused without decoding
    size: int = -1                  # file size and mtime_ns, for the fingerprint
    mtime_ns: int = -1
    # A manifest's box (x, y, w, h): the item is that crop of `file` (pipeline/data/boxes.py).
    box: Box | None = None

    @property
    def payload(self) -> str | np.ndarray | tuple:
        if self.box is not None:
            return (self.file, self.box)
        return self.array if self.array is not None else self.file


def source_kind(source: str) -> str:
    """"builtin", "manifest" or "folder"; raises SourceError for anything else."""
    if source in BUILTIN_DATASETS:
        return "builtin"
    path = Path(source)
    if path.is_file() and path.suffix.lower() in MANIFEST_EXTENSIONS:
        return "manifest"
    if path.is_dir():
        return "folder"
    if path.exists():
        raise SourceError(
            f"source {source!r} is a file but not a .csv/.parquet manifest"
        )
    raise SourceError(
        f"source {source!r} not found: expected a folder with one sub-folder per class, "
        f"a .csv/.parquet manifest, or a built-in dataset ({', '.join(BUILTIN_DATASETS)})"
    )


def discover(data: DataConfig) -> list[SourceItem]:
    kind = source_kind(data.source)
    if kind == "builtin":
        return load_builtin(data.source)
    if kind == "manifest":
        return list_manifest(data.source, data.box_units)
    return list_folder(data.source, data.label_from)


# --------------------------------------------------------------------------- folders


def _stat_item(file: str | os.PathLike, **fields) -> SourceItem:
    try:
        st = os.stat(file)
    except OSError:
        return SourceItem(file=str(file), reject=fields.pop("reject", "") or "file not found", **fields)
    return SourceItem(file=str(file), size=st.st_size, mtime_ns=st.st_mtime_ns, **fields)


def _extension_reject(name: str) -> str:
    suffix = os.path.splitext(name)[1].lower()
    if suffix in IMAGE_EXTENSIONS:
        return ""
    return f"unsupported file type ({suffix or 'no extension'})"


def list_folder(root: str | os.PathLike, label_from: str = "first") -> list[SourceItem]:
    """Every non-hidden file under `root`, sorted by relative path.

    label_from="first": the first-level sub-folder names the class (any depth below).
    label_from="parent": the file's own folder names it (cifar10/train/cat/x.jpg -> cat).
    """
    if label_from not in ("first", "parent"):
        raise SourceError(f"label_from must be 'first' or 'parent', got {label_from!r}")
    if not Path(root).is_dir():
        raise SourceError(f"source folder not found: {root}")
    absolute_root = str(Path(root).resolve())
    items = []
    seen_dirs: set[tuple[int, int]] = set()
    # Plain strings, not pathlib: listing 60k files is otherwise dominated by Path objects.
    # followlinks so that class folders may be symlinks; seen_dirs stops link loops.
    for dirpath, dirnames, filenames in os.walk(absolute_root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, absolute_root)
        parts = [] if rel_dir == os.curdir else rel_dir.split(os.sep)
        if not parts:
            label = ""
        else:
            label = parts[0] if label_from == "first" else parts[-1]
        prefix = "/".join(parts) + "/" if parts else ""
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            reject = _extension_reject(name) if parts else "not in a class folder"
            items.append(_stat_item(
                full, id=prefix + name, path=Path(full).as_posix() if os.sep != "/" else full,
                label_name=label, reject=reject,
            ))
    items.sort(key=lambda item: item.id)
    return items


# --------------------------------------------------------------------------- manifests


def read_manifest_table(path: str | os.PathLike):
    import pandas as pd

    path = Path(path)
    try:
        if path.suffix.lower() == ".parquet":
            frame = pd.read_parquet(path)
        else:
            # Everything as text, and an empty cell stays "" instead of NaN.
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - pandas raises many kinds
        raise SourceError(f"cannot read manifest {path}: {exc}") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in MANIFEST_REQUIRED if c not in frame.columns]
    if missing:
        raise SourceError(
            f"manifest {path} lacks required column(s) {missing}: required {list(MANIFEST_REQUIRED)} "
            f"(optional {list(MANIFEST_OPTIONAL)}), found {list(frame.columns)}"
        )
    columns = [c for c in (*MANIFEST_REQUIRED, *MANIFEST_OPTIONAL) if c in frame.columns]
    frame = frame[columns].astype(object).where(frame[columns].notna(), "")
    return frame.astype(str)


def list_manifest(path: str | os.PathLike, box_units: str = "pixels") -> list[SourceItem]:
    """Rows of a `path,label[,text][,group][,id][,role][,x,y,w,h]` table; relative paths resolve against
    the manifest's folder. Row order is kept; a repeated id is rejected after its first use. A row with a box is
    the crop of its image (in `box_units`); without an `id` its id is the image's and the box
    (`shirts/1.jpg#10,20,64,80`), so several boxes of one image are several items."""
    path = Path(path)
    base = path.resolve().parent
    frame = read_manifest_table(path)
    items = []
    seen: set[str] = set()
    for number, row in enumerate(frame.to_dict("records"), start=1):
        rel = row["path"].strip()
        label = row["label"].strip()
        item_id = row.get("id", "").strip() or PurePosixPath(rel.replace("\\", "/")).as_posix()
        box_reject = ""
        try:
            box = parse_box(row, box_units)
        except BoxError as exc:
            box, box_reject = None, str(exc)
        if box is not None and not row.get("id", "").strip():
            item_id = box_item_id(item_id, box)
        fields = dict(
            id=item_id, label_name=label, box=box,
            text=row.get("text", ""), group=row.get("group", "").strip(), role=row.get("role", "").strip(),
        )
        if not rel:
            items.append(SourceItem(path="", reject=f"empty path (row {number})", **fields))
            continue
        file = Path(rel) if Path(rel).is_absolute() else base / rel
        fields["path"] = file.as_posix()
        if item_id in seen:
            fields["reject"] = f"duplicate id {item_id!r}"
        elif not label:
            fields["reject"] = "empty label"
        elif box_reject:
            fields["reject"] = box_reject
        else:
            fields["reject"] = _extension_reject(rel)
        seen.add(item_id)
        if not fields["reject"] and not file.is_file():
            fields["reject"] = "file not found"
        items.append(_stat_item(file, **fields))
    return items


# --------------------------------------------------------------------------- built-ins


def load_builtin(name: str) -> list[SourceItem]:
    """All images of a built-in dataset, train then test pooled (our splitter re-splits)."""
    if name == "fashion_mnist":
        images, labels = load_fashion_mnist()
        classes = FASHION_MNIST_CLASSES
    elif name == "cifar10":
        images, labels = load_cifar10()
        classes = CIFAR10_CLASSES
    else:
        raise SourceError(f"unknown built-in dataset {name!r}; known: {', '.join(BUILTIN_DATASETS)}")
    return [
        SourceItem(
            id=f"{name}-{i:06d}", path=f"builtin:{name}/{i}",
            label_name=classes[int(label)], array=images[i],
        )
        for i, label in enumerate(labels)
    ]


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An (optionally gzipped) IDX file of unsigned bytes, as used by (Fashion-)MNIST."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise SourceError(f"{path}: not an IDX file")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise SourceError(f"{path}: IDX element type 0x{dtype_code:02x} is not unsigned byte")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    count = int(np.prod(shape))
    offset = 4 + 4 * ndim
    if len(raw) - offset != count:
        raise SourceError(f"{path}: expected {count} values for shape {shape}, found {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def keras_cache_dir() -> Path:
    home = os.environ.get("KERAS_HOME")
    return Path(home) if home else Path.home() / ".keras"


def _fashion_mnist_from(folder: Path) -> tuple[np.ndarray, np.ndarray] | None:
    if not all((folder / f).is_file() for pair in FASHION_MNIST_FILES for f in pair):
        return None
    images, labels = [], []
    for image_file, label_file in FASHION_MNIST_FILES:
        x, y = read_idx(folder / image_file), read_idx(folder / label_file)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise SourceError(f"{folder}: {image_file} and {label_file} do not match")
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def fashion_mnist_locations() -> list[Path]:
    return [keras_cache_dir() / "datasets" / "fashion-mnist", DEBIAN_FASHION_MNIST]


def load_fashion_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Pooled (70000, 28, 28) uint8 images and labels: Keras's cache, then Debian's
    dataset-fashion-mnist package, then Keras's downloader."""
    for folder in fashion_mnist_locations():
        found = _fashion_mnist_from(folder)
        if found is not None:
            return found
    try:
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
    except Exception as exc:  # noqa: BLE001 - offline downloads fail in many ways
        places = ", ".join(str(p) for p in fashion_mnist_locations())
        raise SourceError(
            f"Fashion-MNIST not found in {places}, and keras.datasets.fashion_mnist.load_data() "
            f"failed ({type(exc).__name__}: {exc}). Offline, install it with "
            f"`apt-get install dataset-fashion-mnist` (files in {DEBIAN_FASHION_MNIST})."
        ) from exc
    return np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test]).reshape(-1)


def load_cifar10() -> tuple[np.ndarray, np.ndarray]:
    """Pooled (60000, 32, 32, 3) uint8 images and labels through Keras (cache, then download)."""
    try:
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as exc:  # noqa: BLE001
        raise SourceError(
            f"CIFAR-10 could not be loaded with keras.datasets.cifar10.load_data() "
            f"(cache {keras_cache_dir() / 'datasets'}; {type(exc).__name__}: {exc}). "
            "Offline, a folder of CIFAR-10 images (e.g. an extracted cifar10.tar.gz with "
            "cifar10/{train,test}/<class>/*.jpg) can be ingested instead with "
            "`source: <that folder>` and `label_from: parent`."
        ) from exc
    return np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test]).reshape(-1)
