"""The dataset section of the phase-2 report: facts, splits, classes, rejected files, duplicates and label
conflicts.

`dataset_context` reads what phase 0 left beside dataset.json (rejects.csv, manifest.csv) and copies
rejects.csv next to the report, so the full list opens from the report's folder; `dataset_view` turns that
context into formatted rows.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any
from collections.abc import Mapping

from pipeline.core.artifacts import MANIFEST_CSV, REJECTS_CSV
from pipeline.core.atomic import atomic_path
from pipeline.reporting.formatting import DASH, fmt, fmt_count, is_number, to_float

# Rejected files listed in the report; the rest are counted and linked.
MAX_REJECTS_SHOWN = 30
MAX_GROUPS_SHOWN = 50


def dataset_context(dataset_dir: Path, meta: Mapping, report_dir: Path) -> dict:
    """dataset.json's content plus the first rejects (path, reason) and each label conflict's members."""
    dataset = dict(meta)
    rejects_path = Path(dataset_dir) / REJECTS_CSV
    if rejects_path.is_file():
        with open(rejects_path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        dataset["rejects"] = [{"path": r.get("path", ""), "reason": r.get("reason", "")}
                              for r in rows[:MAX_REJECTS_SHOWN]]
        dataset["n_rejects"] = len(rows)
        if rows:
            with atomic_path(Path(report_dir) / REJECTS_CSV) as tmp:
                shutil.copyfile(rejects_path, tmp)
            dataset["rejects_file"] = REJECTS_CSV
    manifest_path = Path(dataset_dir) / MANIFEST_CSV
    conflicts = meta.get("conflicting_duplicates")
    if (conflicts or conflicts is None) and manifest_path.is_file():
        dataset["label_conflicts"] = label_conflicts(manifest_path, conflicts)
    return dataset


def label_conflicts(manifest_path: Path, groups: list[list[str]] | None) -> list[list[dict]]:
    """Each group of identical files whose copies carry different labels, as (id, path, label) members.

    `groups` are the id groups phase 0 recorded; a dataset.json written before phase 0 recorded them
    (None) has them recomputed from the manifest's sha256 column.
    """
    with open(manifest_path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    by_id = {r["id"]: r for r in rows}
    if groups is None:
        by_hash: dict[str, list[dict]] = {}
        for r in rows:
            if r.get("sha256"):
                by_hash.setdefault(r["sha256"], []).append(r)
        groups = sorted(sorted(r["id"] for r in members) for members in by_hash.values()
                        if len({r["label_name"] for r in members}) > 1)
    return [[{"id": i, "path": by_id.get(i, {}).get("path") or i, "label": by_id.get(i, {}).get("label_name", "?")}
             for i in group] for group in groups]


def _ratio(value: Any) -> str:
    # Split ratios are short decimals the user typed (0.8, 0.05); three fixed
    # decimals would only add noise.
    number = to_float(value)
    return f"{number:g}" if number is not None else fmt(value)


def _ratios_text(ratios: Any) -> str:
    if isinstance(ratios, Mapping):
        return " · ".join(f"{k} {_ratio(v)}" for k, v in ratios.items()) or DASH
    if isinstance(ratios, (list, tuple)):
        return " · ".join(_ratio(v) for v in ratios) or DASH
    return _ratio(ratios)


def _rejects_view(dataset: Mapping) -> dict | None:
    listed = [r for r in dataset.get("rejects") or [] if isinstance(r, Mapping)]
    total = to_float(dataset.get("n_rejects"))
    total = int(total) if total is not None else len(listed)
    if not total:
        return None
    return {"rows": [{"path": fmt(r.get("path")), "reason": fmt(r.get("reason"))} for r in listed],
            "total": fmt_count(total), "more": max(total - len(listed), 0), "file": dataset.get("rejects_file")}


def _conflicts_view(dataset: Mapping) -> list[str]:
    out = []
    for group in dataset.get("label_conflicts") or []:
        if isinstance(group, (list, tuple)):
            out.append(", ".join(f"{m.get('path')} ({m.get('label')})" if isinstance(m, Mapping) else str(m)
                                 for m in group))
    if not out:  # the ids phase 0 recorded, when the manifest was not there to name paths and labels
        out = [", ".join(str(x) for x in g) if isinstance(g, (list, tuple)) else str(g)
               for g in dataset.get("conflicting_duplicates") or [] if g]
    return out


def _texts_facts(texts: Any) -> list[tuple[str, str]]:
    """Phase 0's text counts, for datasets with any text (a folder of images has none to report)."""
    if not isinstance(texts, Mapping) or not (texts.get("with_text") or texts.get("missing_in_source")):
        return []
    missing = texts.get("missing_in_source") if isinstance(texts.get("missing_in_source"), Mapping) else {}
    facts = [("items with text", fmt_count(texts.get("with_text"))),
             ("items without text", fmt_count(texts.get("empty")))]
    if missing:
        facts.append(("texts missing in the source", ", ".join(f"{reason} {fmt_count(n)}"
                                                                for reason, n in missing.items())))
    if texts.get("from_prompt"):
        facts.append(("texts from the class prompt", f"{fmt_count(texts['from_prompt'])} ({fmt(texts.get('prompt'))})"))
    if texts.get("over_long"):
        facts.append((f"texts over {fmt_count(texts.get('max_text_chars'))} characters", fmt_count(texts["over_long"])))
    return facts


def _roles_facts(roles: Any) -> list[tuple[str, str]]:
    """Phase 0's role counts (originals and their versions), for datasets whose items have roles."""
    if not isinstance(roles, Mapping) or not roles.get("with_role"):
        return []
    counts = roles.get("roles") if isinstance(roles.get("roles"), Mapping) else {}
    facts = [("roles", ", ".join(f"{role} {fmt_count(n)}" for role, n in counts.items())),
             ("groups with one original", f"{fmt_count(roles.get('n_groups_with_one_original'))} of "
                                          f"{fmt_count(roles.get('n_groups'))}")]
    for key, what in (("n_groups_without_original", "groups without an original"),
                      ("n_groups_with_several_originals", "groups with several originals"),
                      ("n_roles_without_group", "roles without a group")):
        if roles.get(key):
            facts.append((what, fmt_count(roles[key])))
    return facts


def dataset_view(dataset: Any) -> dict | None:
    if not isinstance(dataset, Mapping) or not dataset:
        return None
    classes = [str(c) for c in dataset.get("classes") or []]
    totals = dataset.get("totals") if isinstance(dataset.get("totals"), Mapping) else {}
    counts = dataset.get("counts") if isinstance(dataset.get("counts"), Mapping) else {}
    splits = list(totals) + [s for s in counts if s not in totals]
    split_totals = []
    for split in splits:
        total = totals.get(split)
        if total is None and isinstance(counts.get(split), Mapping):
            total = sum(v for v in counts[split].values() if is_number(v))
        split_totals.append({"split": str(split), "n": total})
    grand = sum(to_float(r["n"]) or 0 for r in split_totals)
    for r in split_totals:
        value = to_float(r["n"])
        r["share"] = f"{value / grand:.1%}" if value is not None and grand else DASH
        r["n"] = fmt_count(r["n"])

    class_rows = []
    if counts:
        names = classes + sorted({str(c) for s in counts.values() if isinstance(s, Mapping) for c in s}
                                 - set(classes))
        for name in names:
            values = []
            for split in splits:
                per_split = counts.get(split) if isinstance(counts.get(split), Mapping) else {}
                values.append(fmt_count(per_split.get(name, 0)))
            class_rows.append({"name": name, "values": values})

    single = [str(c) for c in dataset.get("single_image_classes") or []]
    groups = [g for g in dataset.get("duplicate_groups") or [] if g]
    duplicate_rows = [", ".join(str(x) for x in g) if isinstance(g, (list, tuple)) else str(g) for g in groups]
    conflicts = _conflicts_view(dataset)
    facts = [
        ("name", fmt(dataset.get("name"))),
        ("source", fmt(dataset.get("source"))),
        ("split", fmt(dataset.get("split"))),
        ("ratios", _ratios_text(dataset.get("ratios")) if "ratios" in dataset else DASH),
        ("seed", fmt(dataset.get("seed"))),
        ("classes", fmt_count(len(classes)) if classes else DASH),
        ("images kept", fmt_count(dataset.get("n_images"))),
        ("images rejected", fmt_count(dataset.get("n_rejects"))),
    ]
    facts += _texts_facts(dataset.get("texts")) + _roles_facts(dataset.get("roles"))
    return {
        "facts": facts, "classes": classes, "splits": [str(s) for s in splits], "split_totals": split_totals,
        "class_rows": class_rows, "single": single, "duplicates": duplicate_rows[:MAX_GROUPS_SHOWN],
        "n_duplicate_groups": len(duplicate_rows),
        "n_duplicate_items": sum(len(g) for g in groups if isinstance(g, (list, tuple))),
        "conflicts": conflicts[:MAX_GROUPS_SHOWN], "n_conflicts": len(conflicts),
        "rejects": _rejects_view(dataset),
    }
