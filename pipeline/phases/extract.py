"""Phase 1: run each pretrained backbone over the TFRecords and store its embeddings.

Per backbone, in `runs/<run>/embeddings/<tag>/` (formats in pipeline/core/artifacts.py):
    embeddings.npy     unit (L2-normalised) vectors, row i = items.csv row i
    features_raw.npy   the pooled features before normalisation (phase 2 compares them)
    items.csv          row, id, split, label, label_name, path, text, group, role
    embeddings.json    the interchange format: [{id, label, label_name, split, path, vector}, …]
    index.faiss        FAISS index over embeddings.npy
    meta.json          written last: its presence (with a matching fingerprint) marks the work done
and for backbones with a text tower (CLIP; `extract.text`, on by default):
    text_embeddings.npy           (n_items, d) float32, unit rows in items.csv's order; all-zero rows
                                  for items without text (items.csv `has_text`); absent when no item has one
    class_prompt_embeddings.npy   (n_classes, d) float32, unit rows in label order: `extract.zero_shot_prompt`
                                  per class, for phase 2's zero-shot classification
    meta.json "text"              counts: items with text, distinct texts, texts cut at 77 tokens, texts/s
and with `extract.tokens` (off by default):
    tokens.npy         (n_items, T, C) float16, row i = items.csv row i: each item's token sequence (CLIP:
                       the vision encoder's class + patch tokens, 50 x 768 for ViT-B/32 at 224 px; a CNN: its
                       last feature map's H x W positions); read back memory-mapped (`load_tokens`).
                       Each shard's part is parts/<shard>.tokens.npy, written before the shard's .npz that
                       marks it done, and the parts are streamed into the memory-mapped file at assembly.
    meta.json "tokens"            {"file", "shape", "dtype"}

Work is checkpointed per TFRecord shard in `parts/`, so an interrupted extraction
resumes at the first unfinished shard; parts are only assembled when all exist.
Texts are embedded once, at assembly, not per shard: they are cheap (a 77-token text
costs a fraction of an image), each distinct text is embedded once, and an interruption
there resumes from the finished parts. Their settings enter the fingerprint, so changing
them redoes the extraction.
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
    dataset_label, extraction_fingerprint, is_current, load_dataset_meta, remove_text_artifacts, remove_tokens,
    write_embedding_artifacts, write_text_artifacts, write_tokens,
)
from pipeline.core.errors import PhaseInputError
from pipeline.core.run_dir import RunDir, backbone_tag
from pipeline.data.validate import class_prompt, missing_text_reason
from pipeline.vectors.normalize import l2_normalize

log = logging.getLogger("embedlab.extract")

# Bump when the way texts are embedded changes (it enters the fingerprint of backbones with a text tower only).
TEXT_EMBEDDING_VERSION = 1


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

    from pipeline.data.record_reader import list_shards
    from pipeline.data.tfrecords import image_dataset, read_metadata

    tag = backbone_tag(backbone)
    out = run_dir.embeddings_dir(tag)
    dataset = dataset_label(run_dir, dataset_meta)
    text = text_settings(backbone, settings)
    fingerprint = extraction_fingerprint(dataset_meta, backbone, settings, text)
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
        extractor = build_feature_extractor(**backbone.extractor_options(with_text=text is not None,
                                                                         with_tokens=settings.tokens))

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
            if settings.tokens:
                # Before the .npz: a part that counts as done always has its tokens.
                atomic.save_npy(_tokens_part(part), np.asarray(outputs["tokens"], dtype=np.float16))
            with atomic.atomic_open(part, "wb") as f:
                np.savez(f, pooled=pooled, split=np.array([split] * len(pooled)),
                         **{k: np.array(v) for k, v in metadata.items()})
    except BaseException:
        _remove_if_nothing_done(out, parts_dir)
        raise
    finally:
        bar.close()

    items, raw = _assemble(parts_dir, [shard for _, shard in shards])
    if extractor.text is not None:
        items["has_text"] = [not missing_text_reason(t) for t in items["text"]]
    write_embedding_artifacts(out, items, raw, l2_normalize(raw), settings)
    tokens_meta = None
    if settings.tokens:
        shape = write_tokens(out, [_tokens_part(parts_dir / f"{shard.stem}.npz") for _, shard in shards])
        tokens_meta = {"file": "tokens.npy", "shape": list(shape), "dtype": "float16"}
    else:
        remove_tokens(out)
    text_meta = None
    if extractor.text is not None:
        text_meta = embed_texts(out, items, extractor.text, list(dataset_meta.get("classes", [])), settings)
    else:
        remove_text_artifacts(out)
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
        "mixed_precision": settings.mixed_precision, "text": text_meta, "tokens": tokens_meta,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    shutil.rmtree(parts_dir, ignore_errors=True)
    log.info("phase 1: wrote %s (%d items of %s%s)", out, items, dataset,
             f", {predicted / predict_seconds:.1f} img/s" if predicted else "")
    return out


def _tokens_part(part: Path) -> Path:
    """Where a shard's token array sits beside its .npz part."""
    return part.with_name(f"{part.stem}.tokens.npy")


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


def _assemble(parts_dir: Path, shards: list[Path]):
    """(items, raw pooled features) of every shard's part, in shard order."""
    import pandas as pd

    # "box": a crop's box in its source image (`path`), "" for whole images (pipeline/data/boxes.py).
    keys = ("split", "id", "label", "label_name", "path", "text", "group", "role", "box")
    pooled, columns = [], {k: [] for k in keys}
    for shard in shards:
        with np.load(parts_dir / f"{shard.stem}.npz") as part:
            pooled.append(part["pooled"])
            for key in columns:
                # A part checkpointed before roles were read has none: its items have no role.
                columns[key].extend(part[key].tolist() if key in part.files else [""] * len(part["pooled"]))
    raw = np.concatenate(pooled).astype(np.float32)
    return pd.DataFrame({"row": np.arange(len(raw)), **columns}), raw


def text_settings(backbone: BackboneConfig, settings: ExtractConfig) -> dict | None:
    """What decides a backbone's text embeddings, for its fingerprint; None when it embeds no text."""
    from models.backbones import get_spec

    if not settings.text or not get_spec(backbone.name).has_text:
        return None
    return {"zero_shot_prompt": settings.zero_shot_prompt, "version": TEXT_EMBEDDING_VERSION}


def embed_texts(out: Path, items, embedder, classes: list[str], settings: ExtractConfig) -> dict:
    """Embed the items' texts (each distinct text once) and one prompt per class; write them; return the
    counts for meta.json. Items without text get all-zero rows."""
    has_text = items["has_text"].to_numpy(bool)
    texts = items["text"].to_numpy(object)
    distinct = list(dict.fromkeys(texts[has_text].tolist()))
    # Where label names with underscores become spaces: pipeline.data.validate.class_prompt.
    prompts = [class_prompt(settings.zero_shot_prompt, name) for name in classes]
    started = time.perf_counter()
    embedded = embedder.embed(distinct, batch_size=settings.batch_size)
    seconds = time.perf_counter() - started
    prompt_embedded = embedder.embed(prompts, batch_size=settings.batch_size)
    if not (np.isfinite(embedded.embedding).all() and np.isfinite(prompt_embedded.embedding).all()):
        raise RuntimeError("the text tower produced non-finite embeddings")
    text_unit, n_truncated = None, 0
    if distinct:
        position = {text: i for i, text in enumerate(distinct)}
        of_item = np.array([position[t] for t in texts[has_text]], dtype=np.int64)
        text_unit = np.zeros((len(items), embedder.dim), np.float32)
        text_unit[has_text] = embedded.embedding[of_item]
        n_truncated = int(embedded.truncated[of_item].sum())
    write_text_artifacts(out, text_unit, prompt_embedded.embedding)
    if n_truncated:
        log.warning("phase 1: %d of %d texts are longer than CLIP's 77 tokens and were cut", n_truncated,
                    int(has_text.sum()))
    log.info("phase 1: %d texts (%d distinct) and %d class prompts embedded%s", int(has_text.sum()),
             len(distinct), len(prompts), f", {len(distinct) / seconds:.1f} texts/s" if distinct else "")
    return {
        "n_items_with_text": int(has_text.sum()), "n_distinct_texts": len(distinct),
        "n_truncated": n_truncated, "texts_per_s": (len(distinct) / seconds) if distinct and seconds else None,
        "dim": embedder.dim, "tokenizer": embedder.tokenizer_source,
        "zero_shot_prompt": settings.zero_shot_prompt, "class_prompts": prompts,
        "n_class_prompts_truncated": int(prompt_embedded.truncated.sum()),
    }
