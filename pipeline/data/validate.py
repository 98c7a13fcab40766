"""Decode and normalise every candidate image of phase 0, in worker processes when it pays off, and check
their texts.

Accepted images are spilled to one temporary file (their encoded bytes), so memory stays flat
however large the source; `Accepted` says where each one's bytes sit.

Texts (captions, prompts, product metadata): an empty, NaN-like ("nan", "None", "NULL", ...) or
whitespace-only text is missing (the item is kept, its text becomes ""); a text longer than
`data.max_text_chars` is reported and kept whole (how much of it CLIP reads, 75 tokens, is counted in
phase 1, where the tokenizer is known); `data.text_prompt` fills in class-name prompts.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import multiprocessing
import random
from collections import Counter, defaultdict, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from collections.abc import Iterator, Sequence

from tqdm import tqdm

from pipeline.config import DataConfig
from pipeline.data import images
from pipeline.data.sources import SourceItem

log = logging.getLogger("embedlab.ingest")

# Below this many images a worker pool costs more to start than it saves.
MIN_ITEMS_FOR_POOL = 64


@dataclass(frozen=True)
class Accepted:
    item: SourceItem
    sha256: str
    format: str
    width: int
    height: int
    reencoded: bool
    offset: int     # where the encoded bytes sit in the spill file
    length: int
    box: str = ""   # a crop's box in its source image (`left,top,width,height` pixels); "" = the whole image


def worker_count(data: DataConfig) -> int:
    if data.workers:
        return data.workers
    from pipeline.core.cpus import available_cores

    return available_cores()


class Validator:
    """Runs images.normalize over items, in worker processes when it pays off.

    The executor starts lazily and is reused across the refill rounds of
    limit_per_class. "spawn" rather than fork: the parent may have TensorFlow (and
    its threads) loaded, and forking a threaded process can deadlock the child.
    ProcessPoolExecutor rather than Pool because it notices workers that die (e.g.
    spawn cannot re-import a `python -` script), where Pool would respawn them
    forever; then the remaining items are done in this process.
    """

    def __init__(self, workers: int, max_side: int) -> None:
        self.workers = workers
        self.fn = functools.partial(images.normalize, max_side=max_side)
        self.executor: ProcessPoolExecutor | None = None

    def __call__(self, items: Sequence[SourceItem]) -> Iterator[images.ImageResult]:
        payloads = [item.payload for item in items]
        bar = tqdm(total=len(items), desc="phase 0: validating", unit="img", disable=None)
        done = 0
        try:
            if self.workers > 1 and len(items) >= MIN_ITEMS_FOR_POOL:
                if self.executor is None:
                    self.executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
                chunk = max(1, min(256, len(items) // (self.workers * 8)))
                try:
                    # map (not as_completed): results come back in input order.
                    for result in self.executor.map(self.fn, payloads, chunksize=chunk):
                        done += 1
                        bar.update()
                        yield result
                except BrokenProcessPool as exc:
                    log.warning("phase 0: worker processes failed (%s); validating in this process", exc)
                    self.close()
                    self.workers = 1
            for payload in payloads[done:]:
                result = self.fn(payload)
                bar.update()
                yield result
        finally:
            bar.close()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None


def validate(candidates: list[SourceItem], data: DataConfig, spill) -> tuple[list[Accepted], list[tuple[str, str]]]:
    """Decode every candidate (or, with limit_per_class, a seeded sample per class,
    topped up from the same shuffled order when sampled images turn out bad)."""
    accepted: list[Accepted] = []
    rejects: list[tuple[str, str]] = []
    validator = Validator(worker_count(data), data.max_side)

    def run(batch: list[SourceItem]) -> Counter:
        good = Counter()
        for item, res in zip(batch, validator(batch)):
            if not res.ok:
                # A box item names its box: several boxes of one image share its path.
                rejects.append((item.id if item.box is not None else item.path or item.id, res.reason))
                continue
            offset = spill.tell()
            spill.write(res.data)
            accepted.append(Accepted(
                item, res.sha256, res.format, res.width, res.height, res.reencoded, offset, len(res.data), res.box,
            ))
            good[item.label_name] += 1
        return good

    try:
        if data.limit_per_class <= 0:
            run(candidates)
        else:
            by_class: dict[str, list[SourceItem]] = defaultdict(list)
            for item in candidates:
                by_class[item.label_name].append(item)
            queues = {}
            for label, members in by_class.items():
                members.sort(key=lambda item: item.id)
                random.Random(f"{data.seed}:limit:{label}").shuffle(members)
                queues[label] = deque(members)
            need = {label: data.limit_per_class for label in queues}
            while True:
                batch = [
                    queues[label].popleft()
                    for label in sorted(queues)
                    for _ in range(min(need[label], len(queues[label])))
                ]
                if not batch:
                    break
                for label, n in run(batch).items():
                    need[label] -= n
    finally:
        validator.close()
    return accepted, rejects


# --------------------------------------------------------------------------- texts

# What spreadsheets and pandas write for "no value"; compared case-insensitively, after stripping.
NAN_LIKE_TEXTS = frozenset({"nan", "none", "null", "na", "n/a", "<na>", "#n/a", "nat"})
OVER_LONG_EXAMPLES = 5


def missing_text_reason(text: str) -> str:
    """"" for a usable text, else why it counts as missing: "empty", "NaN-like" or "whitespace only"."""
    if text == "":
        return "empty"
    stripped = text.strip()
    if not stripped:
        return "whitespace only"
    return "NaN-like" if stripped.lower() in NAN_LIKE_TEXTS else ""


def class_prompt(template: str, label_name: str) -> str:
    """The prompt of one class: `{label}` filled with its name, underscores as spaces ("ankle_boot" reads
    "ankle boot" to a text encoder). The template was checked by pipeline.config.validate."""
    return template.format(label=label_name.replace("_", " "))


@dataclass(frozen=True)
class TextCheck:
    items: list[SourceItem]         # the items with their texts as the dataset stores them
    missing: dict[str, str]         # id -> why the source's text counts as missing
    from_prompt: frozenset[str]     # ids whose stored text is a class prompt


def check_texts(items: Sequence[SourceItem], data: DataConfig) -> TextCheck:
    """Missing texts become "", and `data.text_prompt` fills them ("missing") or replaces every text ("all")."""
    checked, missing, prompted = [], {}, set()
    for item in items:
        reason = missing_text_reason(item.text)
        text = "" if reason else item.text
        if reason:
            missing[item.id] = reason
        if data.text_prompt and (reason or data.text_prompt_mode == "all"):
            text = class_prompt(data.text_prompt, item.label_name)
            prompted.add(item.id)
        checked.append(item if text == item.text else dataclasses.replace(item, text=text))
    return TextCheck(checked, missing, frozenset(prompted))


def text_summary(items: Sequence[SourceItem], check: TextCheck, data: DataConfig) -> dict:
    """dataset.json's "texts": counts over the items kept in the dataset."""
    stored = [item for item in items if item.text]
    over_long = [item.id for item in stored if len(item.text) > data.max_text_chars]
    missing = Counter(check.missing[item.id] for item in items if item.id in check.missing)
    return {
        "with_text": len(stored),
        "empty": len(items) - len(stored),
        # Items whose source text was missing, by reason (a prompt may have filled them since).
        "missing_in_source": dict(sorted(missing.items())),
        "over_long": len(over_long),
        "over_long_examples": over_long[:OVER_LONG_EXAMPLES],
        "from_prompt": sum(item.id in check.from_prompt for item in items),
        "max_text_chars": data.max_text_chars,
        "prompt": data.text_prompt,
        "prompt_mode": data.text_prompt_mode if data.text_prompt else "",
    }


# --------------------------------------------------------------------------- roles

# The role that marks a group's original (compared case-insensitively); any other role is a version of it.
ORIGINAL_ROLE = "original"
ROLE_EXAMPLES = 5


def is_original(role: str) -> bool:
    return role.strip().lower() == ORIGINAL_ROLE


def role_summary(items: Sequence[SourceItem]) -> dict:
    """dataset.json's "roles": how the items' `role` column describes their groups (originals and their versions).

    Not fatal, only reported: a group with no original or with several (phase 2 cannot tell what its versions are
    versions of, and leaves the group out of its group metrics), and a role on an item without a group.
    """
    members: dict[str, list[SourceItem]] = defaultdict(list)
    for item in items:
        if item.group:
            members[item.group].append(item)
    with_role = [item for item in items if item.role]
    roles = Counter(item.role for item in with_role)
    summary = {"with_role": len(with_role), "roles": dict(sorted(roles.items())), "n_groups": len(members)}
    if not with_role:
        return summary
    originals = {group: sum(is_original(m.role) for m in group_items) for group, group_items in members.items()}
    without = sorted(group for group, n in originals.items() if n == 0)
    several = sorted(group for group, n in originals.items() if n > 1)
    orphans = sorted(item.id for item in with_role if not item.group)
    summary.update({
        "n_groups_with_one_original": sum(n == 1 for n in originals.values()),
        "n_groups_without_original": len(without), "groups_without_original": without[:ROLE_EXAMPLES],
        "n_groups_with_several_originals": len(several), "groups_with_several_originals": several[:ROLE_EXAMPLES],
        "n_roles_without_group": len(orphans), "roles_without_group": orphans[:ROLE_EXAMPLES],
    })
    return summary


def role_warnings(summary: dict) -> list[str]:
    """The sentences dataset.json's warnings and the log give for `role_summary`'s findings."""
    warnings = []
    for key, what in (("without_original", "no item with role 'original'"),
                      ("with_several_originals", "more than one item with role 'original'")):
        n = summary.get(f"n_groups_{key}", 0)
        if n:
            warnings.append(f"{n} group{'s have' if n > 1 else ' has'} {what} (e.g. "
                            f"{', '.join(summary[f'groups_{key}'])}): phase 2 leaves "
                            f"{'them' if n > 1 else 'it'} out of the originals-and-versions metrics")
    n = summary.get("n_roles_without_group", 0)
    if n:
        warnings.append(f"{n} item{'s have' if n > 1 else ' has'} a role but no group (e.g. "
                        f"{', '.join(summary['roles_without_group'])}): a role says what an item is within its "
                        "group, so it is ignored there")
    return warnings
