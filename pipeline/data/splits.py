"""Assign every item to train / val / test, deterministically under a seed.

Units. Items that share a `group` value, and exact duplicates (same sha256), are
joined (union-find) into one unit; a unit is never split across splits, so the same
picture can never sit in train and in test. With "stratified", crops of one source
image (`source`) are joined too: two garments of one photo share its person and
background, which would leak from train into test. "classes" does not join them, as
crops of different labels would tie their classes into one block.

"stratified": per class, each split gets its ratio of the class's images. Targets
come from largest-remainder rounding of ratio * n_images (each the floor or ceiling
of the exact share); which split rounds up also weighs the rounding error carried
over from the classes before (in name order), so that split totals stay close to
their ratios too instead of one split winning every tie. Units (shuffled with a
seed derived from the class name, biggest first) go one by one to the split that
is furthest below its target. Small classes then follow these rules, in this order:
  1. a class with a single unit (e.g. a single image) goes to train (ratio > 0);
  2. train gets at least one unit when its ratio is > 0;
  3. a class with >= 2 units gets at least one test unit when the test ratio is > 0,
     taken from val if val has one, else from train if train keeps one.
So with the default 0.7/0.15/0.15 a 2-image class is 1/0/1 and a 3-image class 2/0/1.
A unit whose members carry different labels (conflicting duplicates, mixed groups)
counts for its most frequent label (ties: the smallest name).

"classes": class-disjoint. Classes are ordered ("sorted" by name or "shuffled" with
the seed) and cut, in that order, into train / val / test blocks whose sizes are the
largest-remainder rounding of ratio * n_classes. Classes linked by a unit move as one
block, placed where its first class falls.

Every random choice uses `random.Random` seeded with a string built from the seed (and
the class), so results do not depend on input order, on PYTHONHASHSEED, or on the
other classes.
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from collections.abc import Sequence

from pipeline.data.schema import SPLITS

TRAIN, VAL, TEST = range(3)


@dataclass(frozen=True)
class SplitItem:
    id: str
    label: str          # class name
    sha256: str = ""
    group: str = ""
    source: str = ""    # for a crop, the image it was cut from


@dataclass
class SplitResult:
    assignment: dict[str, str]                          # id -> "train" | "val" | "test"
    duplicate_groups: list[list[str]] = field(default_factory=list)
    conflicting_duplicates: list[list[str]] = field(default_factory=list)
    single_image_classes: list[str] = field(default_factory=list)
    classes_without_test_items: list[str] = field(default_factory=list)


def largest_remainder(n: int, ratios: Sequence[float], carry: Sequence[float] | None = None) -> list[int]:
    """Integers proportional to `ratios` that sum to `n` (Hamilton's method): every
    count is the floor or the ceiling of its exact share.

    The leftover units go to the largest fractional remainders, plus `carry` (the
    rounding error accumulated so far over other classes) when given, so that
    per-class rounding does not always favour the same split; ties go to the
    earlier split."""
    total = float(sum(ratios))
    if n <= 0 or total <= 0:
        return [0] * len(ratios)
    exact = [n * r / total for r in ratios]
    counts = [int(x) for x in exact]
    carry = carry or [0.0] * len(ratios)
    # Only splits with a fractional part may round up: keeps each count at floor or
    # ceiling, and a zero-ratio split at zero.
    candidates = [i for i in range(len(ratios)) if exact[i] - counts[i] > 1e-12]
    candidates.sort(key=lambda i: (-(exact[i] - counts[i] + carry[i]), i))
    for i in candidates[: n - sum(counts)]:
        counts[i] += 1
    return counts


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def build_units(items: Sequence[SplitItem], join_sources: bool = False) -> list[list[int]]:
    """Indices of items joined by a shared group or an identical sha256 (and, with
    `join_sources`, a shared source image), each unit sorted, units ordered by their
    first index."""
    uf = _UnionFind(len(items))
    first: dict[tuple[str, str], int] = {}
    for i, item in enumerate(items):
        keys = [("group", item.group), ("sha256", item.sha256)]
        if join_sources:
            keys.append(("source", item.source))
        for key in keys:
            if not key[1]:
                continue
            if key in first:
                uf.union(first[key], i)
            else:
                first[key] = i
    units: dict[int, list[int]] = defaultdict(list)
    for i in range(len(items)):
        units[uf.find(i)].append(i)
    return sorted(units.values(), key=lambda u: u[0])


def find_duplicates(items: Sequence[SplitItem]) -> tuple[list[list[str]], list[list[str]]]:
    """(all groups of ids with the same sha256, those among them whose labels differ)."""
    by_hash: dict[str, list[SplitItem]] = defaultdict(list)
    for item in items:
        if item.sha256:
            by_hash[item.sha256].append(item)
    groups, conflicts = [], []
    for members in by_hash.values():
        if len(members) < 2:
            continue
        ids = sorted(m.id for m in members)
        groups.append(ids)
        if len({m.label for m in members}) > 1:
            conflicts.append(ids)
    return sorted(groups), sorted(conflicts)


def assign_splits(
    items: Sequence[SplitItem],
    method: str = "stratified",
    ratios: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 42,
    class_order: str = "shuffled",
) -> SplitResult:
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"ratios must be three non-negative numbers, got {list(ratios)}")
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise ValueError(f"item ids must be unique; repeated: {dupes[:5]}")

    units = build_units(items, join_sources=method == "stratified")
    if method == "stratified":
        split_of_unit = _stratified(items, units, ratios, seed)
    elif method == "classes":
        split_of_unit = _class_disjoint(items, units, ratios, seed, class_order)
    else:
        raise ValueError(f"unknown split method {method!r}; expected 'stratified' or 'classes'")

    assignment: dict[str, str] = {}
    for unit, split in zip(units, split_of_unit):
        for i in unit:
            assignment[items[i].id] = SPLITS[split]

    class_sizes = Counter(item.label for item in items)
    has_test = {item.label for item in items if assignment[item.id] == "test"}
    duplicate_groups, conflicts = find_duplicates(items)
    return SplitResult(
        assignment=assignment,
        duplicate_groups=duplicate_groups,
        conflicting_duplicates=conflicts,
        single_image_classes=sorted(c for c, n in class_sizes.items() if n == 1),
        # Class-disjoint splits leave train/val classes without test items by design.
        classes_without_test_items=(
            sorted(c for c in class_sizes if c not in has_test)
            if method == "stratified" and ratios[TEST] > 0 else []
        ),
    )


def _unit_label(items: Sequence[SplitItem], unit: list[int]) -> str:
    counts = Counter(items[i].label for i in unit)
    return min(counts, key=lambda label: (-counts[label], label))


def _stratified(items, units, ratios, seed) -> list[int]:
    by_class: dict[str, list[int]] = defaultdict(list)
    for u, unit in enumerate(units):
        by_class[_unit_label(items, unit)].append(u)

    split_of_unit = [TRAIN] * len(units)
    total = float(sum(ratios))
    carry = [0.0, 0.0, 0.0]  # exact minus assigned, summed over the classes done so far
    for label in sorted(by_class):
        # Start from an order that depends only on the items, not on how they came in.
        members = sorted(by_class[label], key=lambda u: min(items[i].id for i in units[u]))
        random.Random(f"{seed}:stratified:{label}").shuffle(members)
        members.sort(key=lambda u: -len(units[u]))  # stable: shuffled order within a size
        size = {u: len(units[u]) for u in members}
        n = sum(size.values())
        targets = largest_remainder(n, ratios, carry)
        filled = [0, 0, 0]
        chosen: list[list[int]] = [[], [], []]
        for u in members:
            split = max(range(3), key=lambda s: (targets[s] - filled[s], -s))
            filled[split] += size[u]
            chosen[split].append(u)
        _small_class_rules(chosen, ratios)
        for split, us in enumerate(chosen):
            carry[split] += n * ratios[split] / total - sum(size[u] for u in us)
            for u in us:
                split_of_unit[u] = split
    return split_of_unit


def _small_class_rules(chosen: list[list[int]], ratios) -> None:
    """Apply rules 1-3 of the module docstring to one class; moves the last-placed
    (i.e. smallest) unit of the donor split."""
    n_units = sum(len(us) for us in chosen)

    def move(src: int, dst: int) -> None:
        chosen[dst].append(chosen[src].pop())

    if n_units == 1:
        if ratios[TRAIN] > 0 and not chosen[TRAIN]:
            move(VAL if chosen[VAL] else TEST, TRAIN)
        return
    if ratios[TRAIN] > 0 and not chosen[TRAIN]:
        move(max((VAL, TEST), key=lambda s: len(chosen[s])), TRAIN)
    if ratios[TEST] > 0 and not chosen[TEST]:
        if chosen[VAL]:
            move(VAL, TEST)
        elif len(chosen[TRAIN]) >= 2:
            move(TRAIN, TEST)


def _class_disjoint(items, units, ratios, seed, class_order) -> list[int]:
    if class_order not in ("sorted", "shuffled"):
        raise ValueError(f"class_order must be 'sorted' or 'shuffled', got {class_order!r}")
    classes = sorted({item.label for item in items})
    if class_order == "shuffled":
        random.Random(f"{seed}:classes").shuffle(classes)

    # Classes that share a unit must share a split.
    index = {c: k for k, c in enumerate(classes)}
    uf = _UnionFind(len(classes))
    for unit in units:
        labels = sorted({items[i].label for i in unit})
        for other in labels[1:]:
            uf.union(index[labels[0]], index[other])

    counts = largest_remainder(len(classes), ratios)
    bounds = [counts[0], counts[0] + counts[1]]
    split_of_block: dict[int, int] = {}
    for position, c in enumerate(classes):
        block = uf.find(index[c])
        if block not in split_of_block:
            split_of_block[block] = TRAIN if position < bounds[0] else VAL if position < bounds[1] else TEST
    split_of_class = {c: split_of_block[uf.find(index[c])] for c in classes}
    return [split_of_class[items[unit[0]].label] for unit in units]
