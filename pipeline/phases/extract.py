"""Phase 1: run each pretrained backbone over the TFRecords and store its embeddings.

Per backbone, in `runs/<run>/embeddings/<tag>/` (formats in pipeline/core/artifacts.py):
    embeddings.npy     unit (L2-normalised) vectors, row i = items.csv row i
    features_raw.npy   the pooled features before normalisation (phase 2 compares them)
    items.csv          row, id, split, label, label_name, path, text, group
    embeddings.json    the interchange format: [{id, label, label_name, split, path, vector}, …]
    index.faiss        FAISS index over embeddings.npy
    meta.json          written last: its presence (with a matching fingerprint) marks the work done

Work is checkpointed per TFRecord shard in `parts/`, so an interrupted extraction
resumes at the first unfinished shard; parts are only assembled when all exist.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.config import BackboneConfig, ExtractConfig, RunConfig
from pipeline.core import atomic
from pipeline.core.artifacts import (
    dataset_label, extraction_fingerprint, is_current, load_dataset_meta, write_embedding_artifacts,
)
from pipeline.core.errors import PhaseInputError
from pipeline.core.run_dir import RunDir, backbone_tag
from pipeline.vectors.normalize import l2_normalize

log = logging.getLogger("embedlab.extract")


def run_extract(config: RunConfig, force: bool = False) -> list[Path]:
    import keras

    run_dir = RunDir(config)
    dataset_meta = load_dataset_meta(run_dir)
    if config.extract.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        from pipeline.core.distribute import inference_strategy

        strategy = inference_strategy()
        return [extract_backbone(run_dir, dataset_meta, b, config.extract, strategy, force)
                for b in config.extract.backbones]
    finally:
        keras.mixed_precision.set_global_policy("float32")


def extract_backbone(run_dir: RunDir, dataset_meta: dict, backbone: BackboneConfig, settings: ExtractConfig,
                     strategy, force: bool = False) -> Path:
    import tensorflow as tf
    from tqdm.auto import tqdm

    from models.backbones import build_feature_extractor

    from pipeline.data.tfrecords import image_dataset, list_shards, read_metadata

    tag = backbone_tag(backbone)
    out = run_dir.embeddings_dir(tag)
    dataset = dataset_label(run_dir, dataset_meta)
    fingerprint = extraction_fingerprint(dataset_meta, backbone, settings)
    meta_path = out / "meta.json"
    if not force and is_current(meta_path, fingerprint) and \
            not _fallback_now_avoidable(atomic.read_json(meta_path), backbone):
        log.info("phase 1: %s is up to date for %s (use --force to redo)", out, dataset)
        return out
    meta_path.unlink(missing_ok=True)  # the old result no longer describes what is on disk

    shards = [(split, shard) for split in settings.splits for shard in list_shards(run_dir.dataset_dir, split)]
    if not shards:
        raise PhaseInputError(f"no TFRecord shards for splits {settings.splits} in {run_dir.dataset_dir}")

    # Built before any folder is made, so that a failure here (weights that cannot be
    # downloaded, say) leaves nothing behind.
    with strategy.scope():
        extractor = build_feature_extractor(**backbone.extractor_options())

    parts_dir = out / "parts"
    stamp = parts_dir / "fingerprint.txt"
    if force or not stamp.is_file() or stamp.read_text().strip() != fingerprint:
        shutil.rmtree(parts_dir, ignore_errors=True)
    parts_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(stamp, fingerprint)

    finished = sum((parts_dir / f"{shard.stem}.npz").is_file() for _, shard in shards)
    if finished:
        log.info("phase 1: resuming %s: %d of %d shards done", tag, finished, len(shards))
    log.info("phase 1: %s (%s weights, %d px, %d-d) over %d shard(s) of %s", tag, extractor.weights_loaded,
             extractor.image_size, extractor.dim, len(shards), dataset)

    totals = dataset_meta.get("totals", {})
    total = sum(int(totals.get(split, 0)) for split in settings.splits) or None
    bar = tqdm(total=total, desc=f"extract {tag}", unit="img", dynamic_ncols=True)
    predict_seconds, predicted = 0.0, 0
    try:
        for split, shard in shards:
            part = parts_dir / f"{shard.stem}.npz"
            if part.is_file():
                with np.load(part) as done:
                    bar.update(len(done["pooled"]))
                continue
            metadata = read_metadata([shard])
            started = time.perf_counter()
            n = len(metadata["id"])
            batches = image_dataset([shard], extractor.image_size, settings.batch_size).apply(
                tf.data.experimental.assert_cardinality(-(-n // settings.batch_size)))
            outputs = extractor.model.predict(
                batches, verbose=0, callbacks=[_ProgressCallback(bar, n, settings.batch_size)])
            predict_seconds += time.perf_counter() - started
            pooled = np.asarray(outputs["pooled"], dtype=np.float32)
            if len(pooled) != len(metadata["id"]):
                raise RuntimeError(f"{shard}: {len(pooled)} embeddings for {len(metadata['id'])} records")
            if not np.isfinite(pooled).all():
                raise RuntimeError(f"{shard}: the backbone produced non-finite features")
            predicted += len(pooled)
            with atomic.atomic_open(part, "wb") as f:
                np.savez(f, pooled=pooled, split=np.array([split] * len(pooled)),
                         **{k: np.array(v) for k, v in metadata.items()})
    except BaseException:
        _remove_if_nothing_done(out, parts_dir)
        raise
    finally:
        bar.close()

    _assemble(out, parts_dir, [shard for _, shard in shards], settings)
    counts = {split: sum(1 for s, _ in shards if s == split) for split in settings.splits}
    items = np.load(out / "embeddings.npy", mmap_mode="r").shape[0]
    atomic.write_json(meta_path, {
        "tag": tag, "backbone": asdict(backbone), "weights_loaded": extractor.weights_loaded,
        "init_seed": extractor.init_seed,
        "image_size": extractor.image_size, "dim": extractor.dim, "n_items": int(items),
        "shards_per_split": counts, "dtype": settings.dtype, "index": settings.index,
        "throughput_img_s": (predicted / predict_seconds) if predicted else None,
        "images_timed": predicted, "dataset": run_dir.dataset_dir.as_posix(),
        "dataset_fingerprint": dataset_meta.get("fingerprint"), "fingerprint": fingerprint,
        "mixed_precision": settings.mixed_precision,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    shutil.rmtree(parts_dir, ignore_errors=True)
    log.info("phase 1: wrote %s (%d items of %s%s)", out, items, dataset,
             f", {predicted / predict_seconds:.1f} img/s" if predicted else "")
    return out


def _remove_if_nothing_done(out: Path, parts_dir: Path) -> None:
    """A failed extraction that finished no shard leaves no empty parts/ (nor an empty out/) behind."""
    if parts_dir.is_dir() and not any(parts_dir.glob("*.npz")):
        shutil.rmtree(parts_dir, ignore_errors=True)
        try:
            out.rmdir()  # only when empty: a finished earlier result stays
        except OSError:
            pass


def _fallback_now_avoidable(meta: dict, backbone: BackboneConfig) -> bool:
    """A random-weights fallback is stale once the ImageNet weights have reached the Keras cache."""
    if not str(meta.get("weights_loaded", "")).startswith("random ("):
        return False
    from models.backbones import get_spec

    return get_spec(backbone.name).trunk.pretrained_cached(backbone.resolved_params())


class _ProgressCallback:
    """Advances a tqdm bar as Keras predicts the batches of one shard of `n` records."""

    def __new__(cls, bar, n: int, batch_size: int):
        import keras

        class Callback(keras.callbacks.Callback):
            done = 0

            def on_predict_batch_end(self, batch, logs=None):
                # Keras 3 passes no outputs here, so progress is counted from the step index.
                seen = min((batch + 1) * batch_size, n)
                bar.update(seen - self.done)
                self.done = seen

        return Callback()


def _assemble(out: Path, parts_dir: Path, shards: list[Path], settings: ExtractConfig) -> None:
    import pandas as pd

    pooled, columns = [], {k: [] for k in ("split", "id", "label", "label_name", "path", "text", "group")}
    for shard in shards:
        with np.load(parts_dir / f"{shard.stem}.npz") as part:
            pooled.append(part["pooled"])
            for key in columns:
                columns[key].extend(part[key].tolist())
    raw = np.concatenate(pooled).astype(np.float32)
    items = pd.DataFrame({"row": np.arange(len(raw)), **columns})
    write_embedding_artifacts(out, items, raw, l2_normalize(raw), settings)
