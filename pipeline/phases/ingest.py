"""Phase 0: images -> validated, de-duplicated, split and sharded TFRecords.

    tfrecords/<dataset>-<settings>/       (or tfrecords/<data.name>/)
        <split>-NNNNN-of-MMMMM.tfrecord   records in a seeded shuffled order per split
        manifest.csv                      one row per record, in shard order
        rejects.csv                       path, reason
        dataset.json                      written last: its presence means "complete"
    runs/<run>/dataset_ref.json           which build the run is made on

The phase is idempotent: dataset.json carries a fingerprint of the data settings and
of the source listing; a second run with the same fingerprint finds every shard
and returns at once. Decoding lives in pipeline/data/validate.py, the writers in
pipeline/data/shards.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Sequence

from pipeline.config import DataConfig, EvaluateConfig, RunConfig
from pipeline.config import validate as validate_config
from pipeline.core.artifacts import DATASET_JSON, MANIFEST_CSV, REJECTS_CSV, dataset_is_current, write_dataset_ref
from pipeline.core.atomic import write_json
from pipeline.core.errors import IngestError
from pipeline.core.run_dir import RunDir, dataset_name
from pipeline.data import shards as shard_writer
from pipeline.data.schema import SCHEMA_VERSION, SPLITS
from pipeline.data.sources import SourceError, SourceItem, discover, load_builtin, source_kind
from pipeline.data.splits import SplitItem, SplitResult, assign_splits
from pipeline.data.validate import (Accepted, TextCheck, check_texts, role_summary, role_warnings, text_summary,
                                    validate)

log = logging.getLogger("embedlab.ingest")

# Bump when the way images are normalised changes, so old datasets get rebuilt.
INGEST_VERSION = 1
# Bump when the way texts are checked or filled changes: it enters the fingerprint of datasets with texts only,
# so datasets without any text (folders, built-ins) are not rebuilt for it.
TEXT_RULES_VERSION = 1
# The console names this many reject reasons, then counts the rest.
REASONS_SHOWN = 5


# --------------------------------------------------------------------------- entry point


def run_ingest(config: RunConfig, force: bool = False) -> Path:
    """Build the run's dataset folder from `config.data`, record it as the run's dataset; return the folder."""
    data = config.data
    run_dir = RunDir(config)
    out = run_dir.new_dataset_dir
    validate_config(config)   # configurations built in code are checked too, not only those the CLI loads

    try:
        kind = source_kind(data.source)
        # Built-ins are fingerprinted by name, so an up-to-date check never loads them.
        listed = None if kind == "builtin" else discover(data)
    except SourceError as exc:
        raise IngestError(str(exc)) from exc
    fingerprint = compute_fingerprint(data, listed)
    if not force:
        current = _current_build(out, data, fingerprint)
        if current is not None:
            log.info("phase 0: %s is up to date (use --force to rebuild)", current)
            write_dataset_ref(run_dir, current, {"name": dataset_name(data), "fingerprint": fingerprint})
            return current

    if listed is None:
        try:
            listed = load_builtin(data.source)
        except SourceError as exc:
            raise IngestError(str(exc)) from exc

    detector_rejects = []
    if data.detector:
        listed, detector_rejects = _detected(listed, data)
    rejects = [(item.id if item.box is not None else item.path or item.id, item.reject)
               for item in listed if item.reject] + detector_rejects
    texts = check_texts([item for item in listed if not item.reject], data)
    candidates = texts.items
    if not candidates:
        detail = f"; all {len(rejects)} file(s) were refused, e.g. {_examples(rejects)}" if rejects else ""
        raise IngestError(f"no image files found in source {data.source!r}{detail}")

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out, prefix=".ingest-spill-") as spill:
        accepted, decode_rejects = validate(candidates, data, spill)
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
                [SplitItem(a.item.id, a.item.label_name, a.sha256, a.item.group, a.item.path if a.box else "")
                 for a in accepted],
                method=data.split, ratios=data.ratios, seed=data.seed, class_order=data.class_order,
            )
        except ValueError as exc:
            raise IngestError(str(exc)) from exc

        # Invalidate before the first shard is replaced: until the new dataset.json
        # lands, readers see an incomplete dataset rather than a mix of two builds.
        (out / DATASET_JSON).unlink(missing_ok=True)
        by_split = shard_writer.shard_order(accepted, result.assignment, data.seed)
        shards = shard_writer.write_shards(out, by_split, label_index, data.shard_size, spill)

    shard_writer.write_manifest(out / MANIFEST_CSV, by_split, label_index)
    shard_writer.write_rejects(out / REJECTS_CSV, rejects)

    summary = _summary(data, kind, fingerprint, classes, accepted, rejects, result, shards, texts)
    summary["warnings"] = evaluation_warnings(summary["counts"], config.evaluate) + role_warnings(summary["roles"])
    write_json(out / DATASET_JSON, summary)
    shard_writer.remove_stale_shards(out, shards)
    write_dataset_ref(run_dir, out, summary)
    _log_summary(out, summary, rejects)
    return out


def _detected(listed: list[SourceItem], data: DataConfig) -> tuple[list[SourceItem], list[tuple[str, str]]]:
    """The listing with each whole image replaced by its detections (pipeline/data/detector.py)."""
    from pipeline.data.detector import DetectorError, detected_items, load_detector

    try:
        detector = load_detector(data.detector)
        return detected_items(listed, detector, data.detector_threshold, data.detector_max_boxes)
    except DetectorError as exc:
        raise IngestError(str(exc)) from None


def _current_build(out: Path, data: DataConfig, fingerprint: str) -> Path | None:
    """The folder that already holds this exact build: `out`, or the folder an earlier
    version of embedlab named after the source alone (adopted as it is, not rebuilt)."""
    if dataset_is_current(out, fingerprint):
        return out
    legacy = Path(data.tfrecords_dir) / dataset_name(data)
    if not data.name and dataset_is_current(legacy, fingerprint):
        return legacy
    return None


def _summary(data: DataConfig, kind: str, fingerprint: str, classes: list[str], accepted: list[Accepted],
             rejects: list[tuple[str, str]], result: SplitResult, shards: dict[str, list[str]],
             texts: TextCheck) -> dict:
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
        "max_text_chars": data.max_text_chars,
        "text_prompt": data.text_prompt,
        "text_prompt_mode": data.text_prompt_mode,
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
        "texts": text_summary([a.item for a in accepted], texts, data),
        "roles": role_summary([a.item for a in accepted]),
        "boxes": box_summary(accepted, rejects, data),
        "shards": shards,
        "fingerprint": fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def box_summary(accepted: list[Accepted], rejects: list[tuple[str, str]], data: DataConfig) -> dict:
    """dataset.json's "boxes": how many items are crops (of how many images), in which unit, and how many box
    rows were refused for their box (the reasons, which all name the box, are in rejects.csv)."""
    crops = [a for a in accepted if a.box]
    refused = sum(1 for _, reason in rejects if "box" in reason)
    return {"n_crops": len(crops), "n_source_images": len({a.item.path for a in crops}),
            "units": data.box_units if crops or refused else "", "n_rejected_box_rows": refused}


# --------------------------------------------------------------------------- idempotency


# The data settings about texts (see compute_fingerprint).
TEXT_SETTINGS = ("max_text_chars", "text_prompt", "text_prompt_mode")
# ... and about boxes: they enter only where the listing has boxes.
BOX_SETTINGS = ("box_units",)
# ... and about the detector: only when one is set.
DETECTOR_SETTINGS = ("detector", "detector_threshold", "detector_max_boxes")


def compute_fingerprint(data: DataConfig, listed: Sequence[SourceItem] | None) -> str:
    """Hash of every data setting but `workers`, plus the source listing (ids, paths,
    labels, texts, groups, roles, sizes, mtimes; a built-in by its name alone).

    A full sha256 rather than `fingerprint_of`: the embeddings of every existing run
    record this value, and changing its recipe would redo all of them. For that reason the
    text settings (and TEXT_RULES_VERSION) enter only where there are texts, or prompts to make.
    """
    h = hashlib.sha256()
    settings = {k: v for k, v in dataclasses.asdict(data).items()
                if k not in ("workers", *TEXT_SETTINGS, *BOX_SETTINGS, *DETECTOR_SETTINGS)}
    h.update(json.dumps(
        {"settings": settings, "schema": SCHEMA_VERSION, "ingest": INGEST_VERSION}, sort_keys=True,
    ).encode())
    if data.text_prompt or any(item.text for item in listed or ()):
        text_settings = {k: getattr(data, k) for k in TEXT_SETTINGS}
        h.update(json.dumps({"texts": text_settings, "rules": TEXT_RULES_VERSION}, sort_keys=True).encode())
    if data.detector:
        h.update(json.dumps({"detector": {k: getattr(data, k) for k in DETECTOR_SETTINGS}}, sort_keys=True).encode())
    if data.detector or any(item.box is not None for item in listed or ()):
        h.update(json.dumps({"boxes": {k: getattr(data, k) for k in BOX_SETTINGS}}, sort_keys=True).encode())
    if listed is None:
        h.update(f"builtin:{data.source}".encode())
    else:
        for item in listed:
            fields = (item.id, item.path, item.label_name, item.text, item.group,
                      item.reject, item.size, item.mtime_ns)
            if item.role:   # only where there is one, so sources without roles keep their fingerprints
                fields += (item.role,)
            if item.box is not None:
                fields += (item.box.text(),)
            h.update(json.dumps(fields).encode() + b"\n")
    return h.hexdigest()


# --------------------------------------------------------------------------- checks and messages


def evaluation_warnings(counts: dict[str, dict[str, int]], settings: EvaluateConfig) -> list[str]:
    """What phase 2 will not be able to score on this split, said while the data can still be changed.

    A query scores only when the gallery holds another image of its class (leave-one-out when
    the query split is in the gallery).
    """
    classes = sorted({c for per_class in counts.values() for c in per_class})
    warnings = []
    if len(classes) == 1:
        warnings.append(f"only one class ({classes[0]}): there is nothing to tell apart, so retrieval "
                        "metrics will say nothing; a folder source needs one sub-folder per class")
    query, gallery = settings.query_split, settings.gallery_splits
    per_class = counts.get(query, {})
    n_queries = sum(per_class.values())
    if n_queries == 0:
        warnings.append(f"the query split {query!r} is empty: phase 2 will have nothing to score")
        return warnings
    unscored = {}
    for label, n in per_class.items():
        in_gallery = sum(counts.get(split, {}).get(label, 0) for split in gallery)
        others = in_gallery - (1 if query in gallery else 0)
        if n and others <= 0:
            unscored[label] = n
    where = f"the gallery ({', '.join(gallery)})"
    if sum(unscored.values()) == n_queries:
        warnings.append(f"no {query} image has another image of its class in {where}: phase 2 will have nothing "
                        "to score; give each class more images, or the query split a larger ratio")
    elif unscored:
        warnings.append(f"{sum(unscored.values())} of {n_queries} {query} images have no other image of their "
                        f"class in {where} and will not be scored (classes: {', '.join(sorted(unscored))})")
    return warnings


def reject_reasons(rejects: list[tuple[str, str]], shown: int = REASONS_SHOWN) -> str:
    """'reason: n, ...' for the commonest reasons; the rest counted, so the numbers add up."""
    reasons = Counter(reason for _, reason in rejects).most_common()
    text = ", ".join(f"{reason}: {n}" for reason, n in reasons[:shown])
    rest = reasons[shown:]
    if rest:
        text += f", and {len(rest)} more reason{'s' if len(rest) > 1 else ''} ({sum(n for _, n in rest)} files)"
    return text


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
        log.warning("phase 0: %d rejected (%s); see %s", len(rejects), reject_reasons(rejects), out / REJECTS_CSV)
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
    _log_texts(summary["texts"], summary["n_images"])
    roles = summary["roles"]
    if roles["with_role"]:
        log.info("phase 0: %d items with a role in %d groups (%s)", roles["with_role"], roles["n_groups"],
                 ", ".join(f"{role}: {n}" for role, n in roles["roles"].items()))
    for warning in summary.get("warnings", []):
        log.warning("phase 0: %s", warning)


def _log_texts(texts: dict, n_images: int) -> None:
    """Missing and over-long texts, said where the dataset has texts at all (a folder source has none)."""
    if texts["from_prompt"]:
        log.info("phase 0: %d of %d texts are class prompts (%r)", texts["from_prompt"], n_images, texts["prompt"])
    missing = texts["missing_in_source"]
    if missing and texts["with_text"] > texts["from_prompt"]:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in missing.items())
        filled = " (filled with class prompts)" if texts["prompt"] else ", kept without text"
        log.warning("phase 0: %d of %d items have no text (%s)%s", sum(missing.values()), n_images, reasons, filled)
    if texts["over_long"]:
        log.warning("phase 0: %d text(s) longer than %d characters (e.g. %s): kept whole; CLIP reads their first "
                    "75 tokens (phase 1 counts the texts it cuts)", texts["over_long"], texts["max_text_chars"],
                    ", ".join(texts["over_long_examples"]))
