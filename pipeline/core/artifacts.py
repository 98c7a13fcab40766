"""The artifact formats: one reader and one writer per artifact, the fingerprints, one "up to date" rule.

    tfrecords/<dataset>/dataset.json     phase 0's summary, written last (`load_dataset_meta`)
    runs/<run>/dataset_ref.json          which dataset build the run was made on (`write_dataset_ref`)
    runs/<run>/embeddings/<tag>/         an embedding set (`write_embedding_artifacts`, `load_embeddings`)
        items.csv (row, id, split, label, label_name, path, text, group, role), embeddings.npy, features_raw.npy,
        embeddings.json, index.faiss, meta.json (last)
        and, for backbones with a text tower (`write_text_artifacts`, `load_text_embeddings`):
        text_embeddings.npy, class_prompt_embeddings.npy, items.csv's `has_text`, meta.json's "text"
        and, with `extract.tokens` (`write_tokens`, `load_tokens`): tokens.npy, meta.json's "tokens"

An artifact is current when its stored fingerprint equals the fingerprint of the settings and
inputs that would produce it now (`is_current`). Every phase checks the fingerprints it depends
on, so a run never reads another run's data without saying so.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
import numpy as np

from pipeline.core import atomic
from pipeline.core.errors import PhaseInputError

# Functions taking `run_dir` take a pipeline.core.run_dir.RunDir; not imported, as run_dir imports this module.
DATASET_JSON = "dataset.json"
MANIFEST_CSV = "manifest.csv"
REJECTS_CSV = "rejects.csv"
DATASET_REF_JSON = "dataset_ref.json"
META_JSON = "meta.json"
ITEMS_CSV = "items.csv"
# Text columns stay text ("001" is a class name, not 1; an empty group is "", not NaN).
ITEMS_DTYPES = {"id": str, "split": str, "label_name": str, "path": str, "text": str, "group": str, "role": str,
                "box": str}
TEXT_EMBEDDINGS_NPY = "text_embeddings.npy"
CLASS_PROMPTS_NPY = "class_prompt_embeddings.npy"
TOKENS_NPY = "tokens.npy"


# --------------------------------------------------------------------------- fingerprints


def fingerprint_of(obj) -> str:
    """A short stable hash of JSON-able settings: an artifact is up to date when its stored
    fingerprint equals the one of the settings and inputs that would produce it now."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recorded_fingerprint(path: Path, key: str = "fingerprint"):
    """The fingerprint a JSON artifact records, or None when it is missing or unreadable."""
    try:
        recorded = atomic.read_json(path)
    except (OSError, ValueError):
        return None
    return recorded.get(key) if isinstance(recorded, dict) else None


def is_current(meta_path: Path, fingerprint: str) -> bool:
    """THE up-to-date rule: the artifact's completion record exists and carries `fingerprint`."""
    return fingerprint is not None and recorded_fingerprint(Path(meta_path)) == fingerprint


def dataset_settings(data) -> dict:
    """The data settings that decide which images land in which split (a DataConfig, or a dataset.json's
    record of one). Not shard_size: it only cuts the same records into other files, rebuilt in place."""
    if dataclasses.is_dataclass(data):
        data = dataclasses.asdict(data)
    fields = ("source", "split", "class_order", "ratios", "seed", "label_from", "max_side", "limit_per_class")
    settings = {k: data.get(k) for k in fields}
    settings["ratios"] = [float(r) for r in settings["ratios"] or []]
    # Prompts change the stored texts; they enter only when set, so datasets without them keep their folders.
    if data.get("text_prompt"):
        settings["text_prompt"] = data["text_prompt"]
        settings["text_prompt_mode"] = data.get("text_prompt_mode") or "missing"
    return settings


def dataset_settings_key(data) -> str:
    """Eight hex digits that tell datasets built from one source with other settings apart."""
    return fingerprint_of(dataset_settings(data))[:8]


def extraction_fingerprint(dataset_meta: dict, backbone, settings, text: dict | None = None) -> str:
    """What a phase-1 embedding set was computed from; `text`: the text settings of a backbone that embeds
    texts (None for the others, so their fingerprints stay those of before texts were embedded)."""
    inputs = {
        "dataset": dataset_meta.get("fingerprint"), "backbone": backbone.fingerprint_fields(),
        "splits": settings.splits, "dtype": settings.dtype, "index": settings.index, "json": settings.write_json,
    }
    if text is not None:
        inputs["text"] = text
    if getattr(settings, "tokens", False):
        # Only when on, so the fingerprints of sets extracted before tokens existed stay the same.
        inputs["tokens"] = True
    return fingerprint_of(inputs)


def evaluation_fingerprint(emb_meta: dict, settings) -> str:
    """What a metrics.json was computed from: these embeddings, under these settings (not the list of ensembles,
    which changes no set's evaluation; an ensemble's own members and combination are in its embeddings' fingerprint)."""
    fields = {k: v for k, v in dataclasses.asdict(settings).items() if k != "ensembles"}
    return fingerprint_of({"embeddings": emb_meta.get("fingerprint"), "created": emb_meta.get("created"),
                           "settings": fields})


def trained_embeddings_fingerprint(training: dict, extract) -> str:
    """What phase-4 embeddings were computed from: this training (its settings and the
    moment it finished, so a forced retrain under the same settings counts as new) and
    these storage settings."""
    return fingerprint_of({"training": training.get("fingerprint"), "finished": training.get("created"),
                           "dtype": extract.dtype, "index": extract.index})


def trained_embeddings_match(recorded: str | None, training: dict, extract) -> bool:
    """Whether phase-4 embeddings recorded as `recorded` are those of this training. Folders written
    before fingerprints were hashed carry the older joined-string form; it describes the same inputs,
    so those embeddings are not redone or refused for it."""
    legacy = f"{training.get('fingerprint')}-{training.get('created')}-{extract.dtype}-{extract.index}"
    return recorded is not None and recorded in (trained_embeddings_fingerprint(training, extract), legacy)


def trained_tag(tag: str, loss: str) -> str:
    return f"{tag}+{loss}"


# --------------------------------------------------------------------------- the dataset


def dataset_is_current(folder: Path, fingerprint: str) -> bool:
    """dataset.json carries `fingerprint` and every file it names is there."""
    if not is_current(folder / DATASET_JSON, fingerprint):
        return False
    summary = atomic.read_json(folder / DATASET_JSON)
    shard_names = [name for names in summary.get("shards", {}).values() for name in names]
    return all((folder / name).is_file() for name in [MANIFEST_CSV, REJECTS_CSV, *shard_names])


def write_dataset_ref(run_dir, folder: Path, summary: dict) -> None:
    """Record in the run which dataset build it is made on (phase 0 writes this)."""
    run_dir.root.mkdir(parents=True, exist_ok=True)
    # The folder's name, not its path: the run still finds it when tfrecords_dir is given another way.
    atomic.write_json(run_dir.dataset_ref, {"folder": Path(folder).name, "name": summary.get("name"),
                                            "fingerprint": summary.get("fingerprint")})


def read_dataset_ref(path: Path) -> dict | None:
    try:
        ref = atomic.read_json(path)
    except (OSError, ValueError):
        return None
    return ref if isinstance(ref, dict) and ref.get("folder") else None


def load_dataset_meta(run_dir) -> dict:
    """dataset.json of the run's dataset, after checking that it is the build the run was made on."""
    folder = run_dir.dataset_dir
    ref = read_dataset_ref(run_dir.dataset_ref)
    name = run_dir.config.name
    # A run with saved settings but no record predates the records: it reads the dataset its settings
    # describe (run_dir.dataset_dir finds the older tfrecords/<name>/ folder when its settings match).
    if ref is None and not run_dir.names_its_dataset and not (run_dir.root / "config.yaml").is_file():
        raise PhaseInputError(
            f"run {name!r} has no dataset: phase 0 was not run for it and no source is configured; "
            f"run `python run.py phase0 --run {name} --source <images>` first")
    path = folder / DATASET_JSON
    if not path.is_file():
        raise PhaseInputError(f"no phase-0 output at {folder} (dataset.json missing) for run {name!r}: "
                              "run `python run.py phase0` first")
    meta = atomic.read_json(path)
    if ref is not None and ref.get("fingerprint") != meta.get("fingerprint"):
        raise PhaseInputError(
            f"the dataset in {folder} was rebuilt (by another run, or from a changed source) since run {name!r} "
            f"was made on it: run `python run.py phase0 --run {name}` to rebuild the run's own dataset")
    return meta


def dataset_label(run_dir, dataset_meta: dict) -> str:
    """How logs name the dataset a phase reads: its name and folder."""
    return f"dataset {dataset_meta.get('name') or run_dir.dataset_dir.name} ({run_dir.dataset_dir})"


# --------------------------------------------------------------------------- embedding sets


def read_items(emb_dir: Path):
    """items.csv; a set extracted before roles were read has no `role` column and reads as having no roles."""
    import pandas as pd

    items = pd.read_csv(emb_dir / ITEMS_CSV, keep_default_na=False, dtype=ITEMS_DTYPES)
    if "role" not in items:
        items["role"] = ""
    return items


def check_embeddings_dataset(emb_dir: Path, emb_meta: dict, dataset_meta: dict | None, name: str = "") -> None:
    """Embeddings extracted from another build of the dataset than the run's must not be read as its own."""
    if dataset_meta is None or emb_meta.get("dataset_fingerprint") is None:
        return
    if emb_meta["dataset_fingerprint"] != dataset_meta.get("fingerprint"):
        run = f" --run {name}" if name else ""
        raise PhaseInputError(f"the embeddings in {emb_dir} were extracted from another build of the dataset than "
                              f"the run's ({dataset_meta.get('name')}): run `python run.py phase1{run}` again")


def load_embeddings(emb_dir: Path, dataset_meta: dict | None = None, run_name: str = ""):
    """(items, unit, raw, meta) of a finished embedding set; with `dataset_meta`, checked to be of that dataset."""
    if not (emb_dir / META_JSON).is_file():
        raise PhaseInputError(f"no finished phase-1 output in {emb_dir}: run `python run.py phase1` first")
    meta = atomic.read_json(emb_dir / META_JSON)
    check_embeddings_dataset(emb_dir, meta, dataset_meta, run_name)
    items = read_items(emb_dir)
    stored = np.load(emb_dir / "embeddings.npy")
    unit = stored.astype(np.float32, copy=False)
    if stored.dtype == np.float16:
        # float16 storage leaves unit vectors up to ~1e-4 off unit length (BENCHMARKS 18), enough to fail the
        # unit/euclidean identity check and to cost phase 2 a second ranking pass; cosine rankings are unchanged.
        from pipeline.vectors.normalize import l2_normalize

        unit = l2_normalize(unit)
    raw = np.load(emb_dir / "features_raw.npy").astype(np.float32, copy=False)
    if not (len(items) == len(unit) == len(raw)):
        raise PhaseInputError(f"{emb_dir}: items.csv, embeddings.npy and features_raw.npy disagree in length")
    return items, unit, raw, meta


def load_phase1_features(emb_dir: Path, dataset_meta: dict | None = None) -> dict:
    """items.csv, features_raw.npy, meta.json and tokens.npy (when cached) of a finished phase-1 run (what
    phase 3 trains on)."""
    for name in (META_JSON, ITEMS_CSV, "features_raw.npy"):
        if not (emb_dir / name).is_file():
            raise PhaseInputError(f"no finished phase-1 output in {emb_dir} ({name} missing): run phase1 first "
                                  "(`python run.py phase1`)")
    meta = atomic.read_json(emb_dir / META_JSON)
    check_embeddings_dataset(emb_dir, meta, dataset_meta)
    items = read_items(emb_dir)
    features = np.load(emb_dir / "features_raw.npy").astype(np.float32, copy=False)
    if len(items) != len(features) or features.ndim != 2:
        raise PhaseInputError(f"{emb_dir}: items.csv ({len(items)} rows) and features_raw.npy {features.shape} "
                              "disagree: run phase1 again")
    # "tokens": the cached token sequences, memory-mapped (None when phase 1 cached none).
    return {"items": items, "features": features, "meta": meta, "dir": emb_dir,
            "tokens": load_tokens(emb_dir, len(items), meta)}


def write_embedding_artifacts(out: Path, items, raw: np.ndarray, unit: np.ndarray, settings) -> None:
    """The files every embedding directory holds but meta.json (phase 1, and phase 4 for trained models);
    the caller writes meta.json last, once these are complete."""
    from pipeline.vectors.index import build_index, save_index

    dtype = np.float16 if settings.dtype == "float16" else np.float32
    with atomic.atomic_open(out / ITEMS_CSV, "w", encoding="utf-8", newline="") as f:
        items.to_csv(f, index=False)
    atomic.save_npy(out / "embeddings.npy", unit.astype(dtype))
    atomic.save_npy(out / "features_raw.npy", raw.astype(dtype))
    save_index(build_index(unit, settings.index), out / "index.faiss")
    if settings.write_json:
        write_embeddings_json(out / "embeddings.json", items, unit)


def write_embeddings_json(path: Path, items, unit: np.ndarray, chunk: int = 2048) -> None:
    """Stream the JSON array so memory stays flat however many items there are."""
    records = items[["id", "label", "label_name", "split", "path"]].to_dict("records")
    with atomic.atomic_open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        for start in range(0, len(unit), chunk):
            vectors = np.round(unit[start:start + chunk].astype(np.float64), 6).tolist()
            lines = []
            for record, vector in zip(records[start:start + chunk], vectors):
                lines.append(json.dumps({**record, "label": int(record["label"]), "vector": vector}))
            f.write(",\n".join(lines))
            f.write(",\n" if start + chunk < len(unit) else "\n")
        f.write("]\n")


# --------------------------------------------------------------------------- text embeddings


def write_text_artifacts(out: Path, text_unit: np.ndarray | None, class_prompts: np.ndarray) -> None:
    """A text tower's arrays, float32 with unit rows: text_embeddings.npy (n_items, d) in items.csv's row order,
    all-zero rows for items without text (None: no item has one, and no file); class_prompt_embeddings.npy
    (n_classes, d), one prompt per class in label order. The caller records meta.json's "text" and writes
    items.csv with its `has_text` column."""
    remove_text_artifacts(out)
    if text_unit is not None:
        atomic.save_npy(out / TEXT_EMBEDDINGS_NPY, np.asarray(text_unit, np.float32))
    atomic.save_npy(out / CLASS_PROMPTS_NPY, np.asarray(class_prompts, np.float32))


def remove_text_artifacts(out: Path) -> None:
    """Text arrays of an earlier extraction no longer describe the embeddings once these are redone."""
    for name in (TEXT_EMBEDDINGS_NPY, CLASS_PROMPTS_NPY):
        (out / name).unlink(missing_ok=True)


def load_text_embeddings(emb_dir: Path, items, meta: dict) -> dict | None:
    """The text side of a finished embedding set, or None when it has none (a backbone without a text tower,
    `extract.text` off, or a trained model's set): {"text": (n, d) or None, "has_text": (n,) bool,
    "class_prompts": (n_classes, d), "prompts": [str], "meta": meta.json's "text"}."""
    info = meta.get("text")
    if not isinstance(info, dict) or not (emb_dir / CLASS_PROMPTS_NPY).is_file():
        return None
    prompts = np.load(emb_dir / CLASS_PROMPTS_NPY).astype(np.float32, copy=False)
    has_text = items["has_text"].astype(bool).to_numpy() if "has_text" in items else np.zeros(len(items), bool)
    text = None
    if has_text.any():
        if not (emb_dir / TEXT_EMBEDDINGS_NPY).is_file():
            raise PhaseInputError(f"{emb_dir}: items.csv marks texts but {TEXT_EMBEDDINGS_NPY} is missing: "
                                  "run `python run.py phase1 --force`")
        text = np.load(emb_dir / TEXT_EMBEDDINGS_NPY).astype(np.float32, copy=False)
        if text.shape[0] != len(items) or text.shape[1] != prompts.shape[1]:
            raise PhaseInputError(f"{emb_dir}: {TEXT_EMBEDDINGS_NPY} {text.shape} does not match items.csv "
                                  f"({len(items)} rows) and the class prompts ({prompts.shape[1]}-d)")
    return {"text": text, "has_text": has_text, "class_prompts": prompts,
            "prompts": list(info.get("class_prompts") or []), "meta": info}


# --------------------------------------------------------------------------- token sequences


def write_tokens(out: Path, parts: list[Path]) -> tuple[int, int, int]:
    """Assemble the per-shard token arrays `parts` (each an (n_i, T, C) .npy, in items.csv's row order) into
    `out/tokens.npy`, (n, T, C) float16, and return its shape.

    Streamed: the file is a memory map (np.lib.format.open_memmap) filled one memory-mapped part at a time,
    so neither the whole array nor a second copy of it is ever in memory; it is published by a rename.
    """
    shapes = [np.load(part, mmap_mode="r").shape for part in parts]
    if not shapes or any(len(shape) != 3 or shape[1:] != shapes[0][1:] for shape in shapes):
        raise PhaseInputError(f"{out}: the shards' token arrays disagree in shape: {sorted(set(shapes))}")
    shape = (sum(shape[0] for shape in shapes), *shapes[0][1:])
    with atomic.atomic_path(out / TOKENS_NPY) as tmp:
        tokens = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
        start = 0
        for part in parts:
            rows = np.load(part, mmap_mode="r")
            tokens[start:start + len(rows)] = rows
            start += len(rows)
        tokens.flush()
        del tokens  # closes the map before the rename
    return shape


def remove_tokens(out: Path) -> None:
    """tokens.npy of an earlier extraction no longer describes the embeddings once these are redone."""
    (out / TOKENS_NPY).unlink(missing_ok=True)


def load_tokens(emb_dir: Path, n_items: int, meta: dict) -> np.ndarray | None:
    """The cached token sequences of an embedding set, memory-mapped read-only ((n_items, T, C) float16), or
    None when it has none (meta.json's "tokens" absent)."""
    info = meta.get("tokens")
    if not isinstance(info, dict):
        return None
    path = emb_dir / TOKENS_NPY
    if not path.is_file():
        raise PhaseInputError(f"{emb_dir}: meta.json records tokens but {TOKENS_NPY} is missing: "
                              "run `python run.py phase1 --force`")
    tokens = np.load(path, mmap_mode="r")
    if tokens.ndim != 3 or tokens.shape[0] != n_items or tokens.dtype != np.float16:
        raise PhaseInputError(f"{emb_dir}: {TOKENS_NPY} is {tokens.dtype} {tokens.shape}, not float16 "
                              f"({n_items}, T, C) as items.csv: run `python run.py phase1 --force`")
    return tokens
