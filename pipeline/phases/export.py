"""Export: a run's chosen model and its whole collection as a search bundle (format: pipeline/serving/bundle.py).

`--model best` takes the model with the highest test MAP@R (unit/cosine: what the bundle's inner-product
index ranks by) among the run's phase-2 and phase-4 evaluations, passing over models that cannot be
deployed (a random-initialised trunk: for tests and timing, not deployment); `--model <tag>` or
`<backbone>[+<loss>]` names one, or an ensemble's tag (`evaluate.ensembles`: its SavedModel runs every member and
combines their embeddings in the graph; the card lists the members). The collection is every item the model's
embeddings hold (all splits), with those very vectors: nothing is re-embedded. The SavedModels are checked
before the bundle is written: reloaded with plain `tf.saved_model.load`, the image model must give back the
stored embeddings of sample collection images from their TFRecord bytes (≤ 1e-4 for float32 runs), and the
text model the Python tokenizer's ids and the text tower's embeddings. A bundle already holding exactly this
export is up to date.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.config import BackboneConfig, RunConfig
from pipeline.core import atomic
from pipeline.core.artifacts import load_embeddings
from pipeline.core.errors import ExportError, PhaseInputError
from pipeline.core.run_dir import RunDir
from pipeline.phases.ensemble import is_ensemble, member_tags
from pipeline.serving.model_export import not_exportable

log = logging.getLogger("embedlab.export")

PROBES_PER_SPLIT = 3
# Texts the text SavedModel's in-graph tokenisation must tokenise exactly as the Python tokenizer.
CHECK_TEXTS = ("red floral dress", "  A  PHOTO of\tthe   SHOES! ", "size 42 jeans, 2024 model",
               "Ñandú café crème brûlée", "cafe\u0301 au lait", "don't stop", "e-mail: x@y.com #tag", "日本語",
               "emoji 👗 dress", "", "x" * 300)


def candidates(run_dir: RunDir) -> list[dict]:
    """Every evaluated model of the run with embeddings on disk: tag, test MAP@R and P@1 (unit/cosine)."""
    found = []
    for metrics_path in sorted((run_dir.root / "eval").glob("*/metrics.json")):
        tag = metrics_path.parent.name
        if not (run_dir.embeddings_dir(tag) / "meta.json").is_file():
            continue
        metrics = atomic.read_json(metrics_path)
        scores = metrics.get("retrieval", {}).get("unit/cosine", {})
        found.append({"tag": tag, "query_split": metrics.get("protocol", {}).get("query_split"),
                      "MAP@R": scores.get("MAP@R"), "P@1": scores.get("P@1"), "metrics": scores})
    return found


def unexportable(run_dir: RunDir, tag: str) -> str | None:
    """Why the model of embeddings `tag` cannot go into a bundle, or None."""
    meta = atomic.read_json(run_dir.embeddings_dir(tag) / "meta.json")
    if is_ensemble(meta):   # every member must be deployable: the bundle runs them all
        missing = [m for m in member_tags(meta) if not (run_dir.embeddings_dir(m) / "meta.json").is_file()]
        reasons = [f"member {m} has no embeddings" for m in missing] + [
            f"member {m}: {why}" for m in member_tags(meta) if m not in missing and (why := unexportable(run_dir, m))]
        return "; ".join(reasons) or None
    if meta.get("trained"):
        model = run_dir.train_dir(meta["base_tag"], meta["loss"]) / "embedding_model.keras"
        base = atomic.read_json(run_dir.embeddings_dir(meta["base_tag"]) / "meta.json")
        return not_exportable(base) or (None if model.is_file() else f"phase 3 wrote no {model}")
    return not_exportable(meta)


def choose_model(run_dir: RunDir, wanted: str = "best") -> tuple[str, str]:
    """(embeddings tag, why it was chosen)."""
    found = candidates(run_dir)
    tags = sorted({c["tag"] for c in found} | {p.parent.name for p in run_dir.root.glob("embeddings/*/meta.json")})
    if wanted != "best":
        base, _, loss = wanted.partition("+")
        matches = [t for t in tags if t == wanted] or [t for t in tags if _names(run_dir, t) == (base, loss)]
        if len(matches) != 1:
            raise PhaseInputError(f"--model {wanted!r} matches {len(matches)} of the run's models "
                                  f"({', '.join(tags) or 'none'}): give one of these tags")
        reason = unexportable(run_dir, matches[0])
        if reason:
            raise PhaseInputError(f"model {matches[0]} cannot be exported: {reason}")
        return matches[0], f"asked for with --model {wanted}"
    scored = sorted((c for c in found if c["query_split"] == "test" and c["MAP@R"] is not None),
                    key=lambda c: (-c["MAP@R"], -(c["P@1"] or 0), c["tag"]))
    if not scored:
        raise PhaseInputError(f"run {run_dir.config.name!r} has no test-split evaluation to pick the best model "
                              "from: run phase2 (and phase4), or name one with --model")
    reasons = {c["tag"]: unexportable(run_dir, c["tag"]) for c in scored}
    for c in scored:
        log.info("export: candidate %s: test MAP@R %.4f, P@1 %.4f%s", c["tag"], c["MAP@R"], c["P@1"] or 0,
                 f" (not exportable: {reasons[c['tag']]})" if reasons[c["tag"]] else "")
    passed = []   # better-scoring models that cannot be deployed
    for c in scored:
        if reasons[c["tag"]]:
            passed.append(f"{c['tag']}: {reasons[c['tag']]}")
        else:
            return c["tag"], (f"highest test MAP@R (unit/cosine) {c['MAP@R']:.4f} of {len(scored)} evaluated "
                              "model(s)" + (f"; passed over {'; '.join(passed)}" if passed else ""))
    raise PhaseInputError("no evaluated model of the run can be exported: " + "; ".join(passed))


def _names(run_dir: RunDir, tag: str) -> tuple[str, str]:
    """(backbone name, loss or "") of embeddings `tag`."""
    meta = atomic.read_json(run_dir.embeddings_dir(tag) / "meta.json")
    return str((meta.get("backbone") or {}).get("name", "")), str(meta.get("loss") or "")


def serving_models(run_dir: RunDir, tag: str, meta: dict):
    """(single-output image model, CLIP text embedder or None, phase-1 meta of its backbone)."""
    import keras

    import models.classifier  # noqa: F401  (custom objects of saved models)
    import models.layers  # noqa: F401
    from models.backbones import build_feature_extractor, get_spec
    from pipeline.serving.serving_model import embedding_output

    if is_ensemble(meta):
        return ensemble_serving_model(run_dir, meta), None, ensemble_phase1_meta(run_dir, meta)
    if meta.get("trained"):
        base = atomic.read_json(run_dir.embeddings_dir(meta["base_tag"]) / "meta.json")
        model_file = run_dir.train_dir(meta["base_tag"], meta["loss"]) / "embedding_model.keras"
        # A trained head (or fine-tuned trunk) moved the image space away from the text tower: no text model.
        return embedding_output(keras.saving.load_model(model_file, compile=False)), None, base
    backbone = BackboneConfig(**meta["backbone"])
    extractor = build_feature_extractor(**backbone.extractor_options(
        weights_fallback="error", with_text=get_spec(backbone.name).has_text))
    if extractor.image_size != meta.get("image_size"):
        raise ExportError(f"{tag}: rebuilt at {extractor.image_size} px, phase 1 ran at {meta.get('image_size')} px")
    return embedding_output(extractor.model), extractor.text, meta


def ensemble_serving_model(run_dir: RunDir, meta: dict):
    """Every member's image model joined in one graph that combines their embeddings (models/ensemble.py)."""
    from models.ensemble import build_ensemble_model

    members = []
    for tag in member_tags(meta):
        member_meta = atomic.read_json(run_dir.embeddings_dir(tag) / "meta.json")
        model, _, _ = serving_models(run_dir, tag, member_meta)
        members.append(model)
    info = meta["ensemble"]
    return build_ensemble_model(members, info["combine"], info["weights"], name="ensemble")


def ensemble_phase1_meta(run_dir: RunDir, meta: dict) -> dict:
    """What the card and the export check read of a phase-1 meta, for an ensemble: its members' backbones, the
    weights they loaded, and the loosest storage / precision of any member."""
    bases = []
    for tag in member_tags(meta):
        member = atomic.read_json(run_dir.embeddings_dir(tag) / "meta.json")
        bases.append(atomic.read_json(run_dir.embeddings_dir(member["base_tag"]) / "meta.json")
                     if member.get("trained") else member)
    return {"backbone": [base.get("backbone") for base in bases], "weights_loaded": meta.get("weights_loaded"),
            "mixed_precision": any(base.get("mixed_precision") for base in bases),
            "dtype": "float16" if any(base.get("dtype") == "float16" for base in bases) else "float32"}


def collection_images(dataset_dir: Path, items) -> Iterator[bytes]:
    """The encoded image of every item, in the items' row order (phase 1's: splits, shards, records)."""
    import tensorflow as tf

    from pipeline.data import schema
    from pipeline.data.record_reader import list_shards

    row = 0
    ids = items["id"].to_numpy()
    for split in dict.fromkeys(items["split"].tolist()):
        shards = [str(p) for p in list_shards(dataset_dir, split)]
        ds = tf.data.TFRecordDataset(shards).batch(256).map(schema.parse)
        for batch in ds.as_numpy_iterator():
            for item_id, encoded in zip(batch["id"], batch["image"]):
                if row >= len(ids) or item_id.decode("utf-8") != ids[row]:
                    raise PhaseInputError(f"the TFRecords in {dataset_dir} no longer match the embeddings' items "
                                          f"(row {row}): run phase1 again")
                row += 1
                yield encoded
    if row != len(ids):
        raise PhaseInputError(f"{dataset_dir} holds {row} records for {len(ids)} embedded items: run phase1 again")


def probe_rows(items) -> np.ndarray:
    """The first few rows of every split: the images the export check runs on."""
    splits = items["split"].to_numpy()
    return np.concatenate([np.flatnonzero(splits == s)[:PROBES_PER_SPLIT] for s in dict.fromkeys(splits.tolist())])


def tolerance(meta: dict, phase1_meta: dict) -> float:
    """How far the SavedModel may be from the stored embeddings: float32 arithmetic and storage 1e-4; float16
    storage rounds unit-vector components by up to 2^-11; mixed_float16 features carry float16 arithmetic."""
    if phase1_meta.get("mixed_precision"):
        return 3e-2
    return 2e-3 if meta.get("dtype") == "float16" or phase1_meta.get("dtype") == "float16" else 1e-4


def run_export(config: RunConfig, model: str = "best", out: str | None = None, force: bool = False) -> Path:
    from pipeline.serving.bundle import current_version, open_bundle, write_bundle
    from pipeline.serving.serving_model import (
        IMAGE_ENDPOINTS, ONNX_INPUT, ONNX_OUTPUT, TEXT_ENDPOINTS, served_image_error, served_text_error,
        write_image_onnx, write_image_saved_model, write_text_saved_model,
    )
    from pipeline.serving.thumbnails import thumbnails_of

    run_dir = RunDir(config)
    root = Path(out) if out else run_dir.root / "bundle"
    tag, why = choose_model(run_dir, model)
    emb_dir = run_dir.embeddings_dir(tag)
    meta = atomic.read_json(emb_dir / "meta.json")
    source = {"run": config.name, "tag": tag, "embeddings": emb_dir.as_posix(),
              "embeddings_created": meta.get("created"), "fingerprint": meta.get("fingerprint")}
    if not force and current_version(root):
        bundle = open_bundle(root)
        bundle.close()
        if bundle.card.get("source") == source and len(bundle.card.get("history", [])) == 1:
            log.info("export: %s (%s) already holds %s; up to date (use --force to write it again)",
                     root, bundle.version, tag)
            return root
    log.info("export: %s — %s", tag, why)
    items, unit, _, _ = load_embeddings(emb_dir)
    started = time.perf_counter()
    image_model, text_embedder, phase1_meta = serving_models(run_dir, tag, meta)
    staging = root / f".export-{config.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        image_size = write_image_saved_model(image_model, staging / "image_model")
        rows = probe_rows(items)
        encoded = _encoded_rows(run_dir.dataset_dir, items, rows)
        max_diff = served_image_error(staging / "image_model", encoded, unit[rows])
        limit = tolerance(meta, phase1_meta)
        if not max_diff <= limit:
            raise ExportError(f"{tag}: the exported image SavedModel differs from the stored embeddings by "
                              f"{max_diff:.2e} (tolerance {limit:.0e}); no bundle was written")
        check = {"images": int(len(rows)), "max_abs_diff": max_diff, "tolerance": limit,
                 "against": f"{emb_dir.as_posix()}/embeddings.npy (TFRecord bytes through serving_default)"}
        # Optional and never fatal: left out, with the reason on the card, when it cannot match the SavedModel.
        check["onnx"] = write_image_onnx(image_model, staging / "image_model.onnx", staging / "image_model", encoded)
        text_model = None
        if text_embedder is not None:
            text_model = staging / "text_model"
            write_text_saved_model(text_embedder, text_model)
            texts = [*CHECK_TEXTS, *items["text"][items["text"] != ""].head(20).tolist()]
            text_check = served_text_error(text_model, text_embedder, texts)
            if not (text_check["ids_equal"] and text_check["max_abs_diff"] <= 1e-4):
                raise ExportError(f"{tag}: the text SavedModel does not reproduce the Python tokenizer and text "
                                  f"tower ({text_check}); no bundle was written")
            check["text"] = {**text_check, "texts": len(texts)}
        export_s = time.perf_counter() - started
        training = _training_summary(run_dir, meta)
        card = {
            "source": source, "selection": why, "backbone": phase1_meta.get("backbone"),
            "weights_loaded": phase1_meta.get("weights_loaded"), "loss": meta.get("loss") or "pretrained",
            "training": training, "image_size": image_size, "metrics": _metrics_of(run_dir, tag),
            "export_check": check, "export_s": export_s, "ensemble": meta.get("ensemble"),
            "models": {"image": {"folder": "image_model", "endpoints": list(IMAGE_ENDPOINTS),
                                 "serving_default": IMAGE_ENDPOINTS[0]},
                       "image_onnx": {"file": "image_model.onnx", "input": ONNX_INPUT, "output": ONNX_OUTPUT,
                                      "pixels": f"float32 [batch, {image_size}, {image_size}, 3], RGB 0..255"}
                       if check["onnx"]["written"] else None,
                       "text": None if text_model is None else {
                           "folder": "text_model", "endpoints": list(TEXT_ENDPOINTS),
                           "serving_default": TEXT_ENDPOINTS[0], "needs": "import tensorflow_text"}},
        }
        columns = items.assign(label=items["label"].astype(np.int64))
        version = write_bundle(root, columns, unit, thumbnails_of(collection_images(run_dir.dataset_dir, items)),
                               staging / "image_model", card, text_model=text_model,
                               image_onnx=staging / "image_model.onnx" if check["onnx"]["written"] else None)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("export: wrote %s (%s): %d items, %s, SavedModel max |diff| %.2e, %.1f s", root, version, len(items),
             tag, max_diff, time.perf_counter() - started)
    return root


def _encoded_rows(dataset_dir: Path, items, rows: np.ndarray) -> list[bytes]:
    wanted = set(int(r) for r in rows)
    found = {}
    for row, encoded in enumerate(collection_images(dataset_dir, items)):
        if row in wanted:
            found[row] = encoded
            if len(found) == len(wanted):
                break
    return [found[int(r)] for r in rows]


def _metrics_of(run_dir: RunDir, tag: str) -> dict | None:
    path = run_dir.eval_dir(tag) / "metrics.json"
    if not path.is_file():
        return None
    metrics = atomic.read_json(path)
    return {"variant": "unit/cosine", "protocol": metrics.get("protocol"),
            **{k: v for k, v in metrics.get("retrieval", {}).get("unit/cosine", {}).items()
               if k in ("P@1", "P@k", "R@k", "mAP", "R-precision", "MAP@R", "n_queries_evaluated")}}


def _training_summary(run_dir: RunDir, meta: dict) -> dict | None:
    if not meta.get("trained"):
        return None
    path = run_dir.train_dir(meta["base_tag"], meta["loss"]) / "training.json"
    summary = atomic.read_json(path) if path.is_file() else {}
    # training.json names the mode phase 3 ran in (phase 4's meta says "finetune" for any image-level model); a
    # distilled student's card names its teacher and the images/s both ran at after training.
    card = {"mode": summary.get("mode") or meta.get("mode"), "loss": meta.get("loss"),
            "epochs_run": summary.get("epochs_run"), "best_val": summary.get("best_val")}
    if summary.get("teacher"):
        card["teacher"] = summary["teacher"].get("spec")
        card["speed"] = summary.get("speed")
    return card



def run_bundle_add(root: str, source: str) -> dict:
    """Add the images of a folder or table (pipeline/phases/infer.py `image_inputs`) to a bundle; unreadable
    files are skipped and reported. Returns {"version", "added", "rejected": {id: reason}}."""
    from pipeline.phases.infer import image_inputs
    from pipeline.serving.bundle import add_items, current_version

    inputs, skipped = image_inputs(source)
    rejected = dict(skipped)
    images, metadata = [], []
    for item in inputs:
        try:
            images.append(Path(item.path).read_bytes())
        except OSError as exc:
            rejected[item.id] = f"unreadable file ({exc.strerror or exc})"
            continue
        metadata.append({"id": item.id, "label_name": item.label_name, "text": item.text, "group": item.group,
                         "path": item.path, "split": item.split or "added"})
    if not images:
        raise PhaseInputError(f"no image to add in {source}" + (f" ({len(rejected)} skipped)" if rejected else ""))
    added = add_items(root, images, metadata, rejected=rejected)
    for item_id, reason in list(rejected.items())[:10]:
        log.warning("bundle add: skipped %s: %s", item_id, reason)
    version = current_version(root)
    log.info("bundle add: %d item(s) added to %s, now %s", len(added), root, version)
    return {"version": version, "added": added, "rejected": rejected}


def run_bundle_remove(root: str, ids: list[str]) -> str:
    from pipeline.serving.bundle import remove_items

    version = remove_items(root, ids)
    log.info("bundle remove: %d item(s) removed from %s, now %s", len(ids), root, version)
    return version
