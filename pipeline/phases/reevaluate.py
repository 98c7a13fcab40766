"""Phase 4: embeddings from every trained model, evaluated exactly as in phase 2.

For a head trained on cached features (phase 3, `mode: head`), the trained model's
embeddings are the head applied to what it was trained on (training.json's "head_input"):
the backbone's phase-1 pooled features or its cached tokens (tokens.npy, memory-mapped, a
chunk of rows at a time), plus the items' text embeddings for a head that fuses them. They are
written as a new embedding directory `runs/<run>/embeddings/<tag>+<loss>/` with the
same files as phase 1 — "raw" now meaning the head's output before L2 normalisation —
so that phase 2's `evaluate_backbone` runs on them unchanged.

A fine-tuned model (`mode: finetune`) changed the backbone, so phase-1 features no
longer apply: its saved image-level model runs over every split's TFRecords again,
in phase 1's row order ("raw" = the input of its final L2 normalisation).
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.config import RunConfig
from pipeline.core import atomic
from pipeline.core.artifacts import (  # noqa: F401  (trained_tag, trained_embeddings_fingerprint: older imports)
    load_dataset_meta, load_embeddings, load_tokens, recorded_fingerprint, trained_embeddings_fingerprint,
    trained_embeddings_match, trained_tag,
    write_embedding_artifacts, remove_text_artifacts, TEXT_EMBEDDINGS_NPY, CLASS_PROMPTS_NPY,
)
from pipeline.core.errors import PhaseInputError
from pipeline.core.run_dir import RunDir
from pipeline.phases.ensemble import write_ensembles
from pipeline.phases.evaluate import evaluate_backbone

log = logging.getLogger("embedlab.reevaluate")


def head_embeddings(head, inputs) -> tuple[np.ndarray, np.ndarray]:
    """(pre-normalisation features, unit embeddings) of a trained head on pooled features (an array), or on
    a list of its input arrays (pipeline/training/head.py `head_inputs`; memory-mapped tokens are read a
    chunk of rows at a time)."""
    from pipeline.training.head import predict_rows

    arrays = inputs if isinstance(inputs, list) else [np.asarray(inputs, dtype=np.float32)]
    pre, unit = predict_rows(with_pre_normalisation(head), arrays, np.arange(len(arrays[0])))
    return np.asarray(pre, dtype=np.float32), np.asarray(unit, dtype=np.float32)


def trained_head_inputs(base_dir: Path, items, raw: np.ndarray, base_meta: dict, training: dict) -> list:
    """The arrays a head-mode model reads for every item, as it was trained (training.json "head_input"; heads
    trained before it existed read the pooled features)."""
    from pipeline.training.head import head_inputs

    kind = training.get("head_input") or {"image": "pooled", "text": False}
    phase1 = {"items": items, "features": raw, "meta": base_meta, "dir": base_dir,
              "tokens": load_tokens(base_dir, len(items), base_meta) if kind.get("image") == "tokens" else None}
    if kind.get("image") == "tokens" and phase1["tokens"] is None:
        raise PhaseInputError(f"the head in {training.get('backbone')} was trained on cached tokens, but "
                              f"{base_dir} holds none: run phase1 with extract.tokens=true")
    return head_inputs(phase1, kind)


def with_pre_normalisation(model):
    """The model with two outputs: the input of its final L2Normalize layer, and its own output."""
    import keras

    from models.layers import L2Normalize

    normalise = next((layer for layer in reversed(model.layers) if isinstance(layer, L2Normalize)), None)
    if normalise is None:
        raise PhaseInputError(f"model {model.name!r} has no L2Normalize layer; not an embedding model")
    return keras.Model(model.inputs, [normalise.input, model.outputs[0]])


def finetuned_embeddings(run_dir: RunDir, model, items, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(pre-normalisation features, unit embeddings) of an image-level model over phase 1's items, in their order."""
    from pipeline.data.record_reader import list_shards
    from pipeline.data.tfrecords import image_dataset, read_metadata

    both = with_pre_normalisation(model)
    image_size = int(model.inputs[0].shape[1])
    pres, units, ids = [], [], []
    # Phase 1 wrote the splits in this order, each in shard and record order.
    for split in dict.fromkeys(items["split"].tolist()):
        shards = list_shards(run_dir.dataset_dir, split)
        split_ids = read_metadata(shards)["id"]
        ids.extend(split_ids)
        if not split_ids:
            continue
        import tensorflow as tf

        # A known length keeps predict from running the dataset dry and warning about it.
        batches = image_dataset(shards, image_size, batch_size).apply(
            tf.data.experimental.assert_cardinality(-(-len(split_ids) // batch_size)))
        pre, unit = both.predict(batches, verbose=0)
        pres.append(pre)
        units.append(unit)
    if ids != items["id"].tolist():
        raise PhaseInputError(f"the TFRecords in {run_dir.dataset_dir} no longer match phase 1's items.csv "
                              f"({len(ids)} records vs {len(items)} items, or in another order): run phase1 again")
    return (np.concatenate(pres).astype(np.float32, copy=False),
            np.concatenate(units).astype(np.float32, copy=False))


def carry_text_side(base_dir: Path, out: Path, base_meta: dict, training: dict, dim: int) -> dict | None:
    """Keep the phase-1 text embeddings beside a model that left the text space where it was; None otherwise.

    Only a finetune without a head (`train.embedding_dim: 0`) keeps CLIP's own image space: its text tower
    was not trained, so the phase-1 text vectors are still the texts of that space, and phase 2 then shows
    how fine-tuning the image tower moved images against them. A head maps images into a new space that no
    text was ever embedded in: no text side there.
    """
    remove_text_artifacts(out)
    info = base_meta.get("text")
    if training.get("mode") != "finetune" or training.get("head") is not False or not isinstance(info, dict) \
            or int(info.get("dim") or 0) != dim:
        return None
    for name in (TEXT_EMBEDDINGS_NPY, CLASS_PROMPTS_NPY):
        if (base_dir / name).is_file():
            atomic.save_npy(out / name, np.load(base_dir / name))
    return {**info, "from": "phase 1 (the text tower was not trained)"}


def run_reevaluate(config: RunConfig, force: bool = False) -> list[str]:
    """Re-embed with each trained model and evaluate; returns the new embedding tags."""
    import keras

    import models.classifier  # noqa: F401  (registers custom objects for load_model)
    import models.heads  # noqa: F401
    import models.layers  # noqa: F401

    from pipeline.training.distill_plan import trained_model_groups

    # A distilled student is an image-level model like a fine-tuned one (pipeline/training/distill.py).
    finetuned = config.train.mode in ("finetune", "distill")
    model_file = "embedding_model.keras" if finetuned else "head.keras"
    run_dir = RunDir(config)
    dataset_meta = None  # read once a trained model is found: a missing model is the first thing to say
    tags = []
    for tag, losses in trained_model_groups(config):
        for loss in losses:
            source = run_dir.train_dir(tag, loss)
            if not (source / "training.json").is_file() or not (source / model_file).is_file():
                raise PhaseInputError(f"no trained model in {source}: run `python run.py phase3` first")
            new_tag = trained_tag(tag, loss)
            dataset_meta = dataset_meta or load_dataset_meta(run_dir)
            training = atomic.read_json(source / "training.json")
            out = run_dir.embeddings_dir(new_tag)
            meta_path = out / "meta.json"
            fingerprint = trained_embeddings_fingerprint(training, config.extract)
            if force or not trained_embeddings_match(recorded_fingerprint(meta_path), training, config.extract):
                items, _, raw, base_meta = load_embeddings(run_dir.embeddings_dir(tag), dataset_meta, config.name)
                if finetuned:
                    if training.get("mode") not in ("finetune", "distill"):
                        raise PhaseInputError(f"{source} holds a head-mode model; run phase3 --mode finetune")
                    model = keras.saving.load_model(source / model_file, compile=False)
                    pre, unit = finetuned_embeddings(run_dir, model, items, config.extract.batch_size)
                else:
                    head = keras.saving.load_model(source / "head.keras", compile=False)
                    pre, unit = head_embeddings(head, trained_head_inputs(run_dir.embeddings_dir(tag), items, raw,
                                                                          base_meta, training))
                meta_path.unlink(missing_ok=True)
                write_embedding_artifacts(out, items, pre, unit, config.extract)
                text_meta = carry_text_side(run_dir.embeddings_dir(tag), out, base_meta, training, unit.shape[1])
                atomic.write_json(meta_path, {
                    **{k: base_meta.get(k) for k in ("backbone", "weights_loaded", "image_size", "dataset",
                                                     "dataset_fingerprint", "throughput_img_s")},
                    "tag": new_tag, "base_tag": tag, "loss": loss, "trained": True,
                    "mode": "finetune" if finetuned else "head",
                    "dim": int(unit.shape[1]), "n_items": int(len(unit)), "training": str(source), "text": text_meta,
                    "fingerprint": fingerprint, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                })
                log.info("phase 4: wrote %s (%d × %d)", out, *unit.shape)
            evaluate_backbone(run_dir, new_tag, config.evaluate, force=force, dataset_meta=dataset_meta)
            tags.append(new_tag)
    # Ensembles with a trained member (evaluate.ensembles), now that the trained members' embeddings are written.
    for tag in write_ensembles(run_dir, dataset_meta or load_dataset_meta(run_dir), True, force):
        evaluate_backbone(run_dir, tag, config.evaluate, force=force, dataset_meta=dataset_meta)
        tags.append(tag)
    return tags
