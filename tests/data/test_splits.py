"""pipeline.data.splits: stratified and class-disjoint splits over duplicate/group units."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from pipeline.data.splits import SplitItem, assign_splits, build_units, largest_remainder


def make_items(sizes: dict[str, int]) -> list[SplitItem]:
    return [
        SplitItem(id=f"{label}/{i:04d}.jpg", label=label, sha256=f"{label}-{i}")
        for label, n in sizes.items() for i in range(n)
    ]


def counts(result, items) -> dict[str, Counter]:
    out: dict[str, Counter] = {}
    for item in items:
        out.setdefault(item.label, Counter())[result.assignment[item.id]] += 1
    return out


@pytest.mark.parametrize("n, ratios, expected", [
    (10, [0.7, 0.15, 0.15], [7, 2, 1]),
    (100, [0.7, 0.15, 0.15], [70, 15, 15]),
    (7, [0.5, 0.0, 0.5], [4, 0, 3]),
    (102, [0.5, 0.0, 0.5], [51, 0, 51]),
    (0, [0.7, 0.15, 0.15], [0, 0, 0]),
    (1, [0.0, 0.0, 1.0], [0, 0, 1]),
])
def test_largest_remainder(n, ratios, expected):
    assert largest_remainder(n, ratios) == expected


def test_largest_remainder_always_sums_to_n():
    rng = random.Random(0)
    for _ in range(200):
        ratios = [rng.random() for _ in range(3)]
        n = rng.randrange(0, 500)
        got = largest_remainder(n, ratios)
        assert sum(got) == n and all(c >= 0 for c in got)


def test_stratified_ratios_per_class():
    items = make_items({"cat": 100, "dog": 40, "eel": 20})
    result = assign_splits(items, "stratified", [0.7, 0.15, 0.15], seed=1)
    c = counts(result, items)
    assert c["cat"] == Counter(train=70, val=15, test=15)
    assert c["dog"] == Counter(train=28, val=6, test=6)
    assert c["eel"] == Counter(train=14, val=3, test=3)
    assert result.classes_without_test_items == [] and result.single_image_classes == []


def test_rounding_ties_do_not_all_favour_one_split():
    # 30 per class: 21 / 4.5 / 4.5. Per class val or test rounds up, alternately.
    items = make_items({f"c{k}": 30 for k in range(10)})
    result = assign_splits(items, "stratified", [0.7, 0.15, 0.15], seed=0)
    assert Counter(result.assignment.values()) == Counter(train=210, val=45, test=45)
    for c in counts(result, items).values():
        assert c["train"] == 21 and {c["val"], c["test"]} == {4, 5}


def test_largest_remainder_with_carry_stays_within_floor_and_ceiling():
    assert largest_remainder(30, [0.7, 0.15, 0.15], carry=[0.0, -0.5, 0.5]) == [21, 4, 5]
    assert largest_remainder(10, [0.7, 0.0, 0.3], carry=[-3.0, 9.0, -3.0]) == [7, 0, 3]
    assert largest_remainder(3, [0.7, 0.15, 0.15], carry=[5.0, 0.0, 0.0]) == [3, 0, 0]
    assert largest_remainder(3, [0.7, 0.15, 0.15], carry=[0.0, 0.0, 0.1]) == [2, 0, 1]


def test_zero_ratio_split_stays_empty():
    items = make_items({"a": 30, "b": 11})
    result = assign_splits(items, "stratified", [0.8, 0.0, 0.2], seed=3)
    assert "val" not in set(result.assignment.values())
    assert counts(result, items)["b"] == Counter(train=9, test=2)


def test_small_classes_follow_the_documented_rules():
    items = make_items({"one": 1, "two": 2, "three": 3, "four": 4, "big": 50})
    result = assign_splits(items, "stratified", [0.7, 0.15, 0.15], seed=0)
    c = counts(result, items)
    assert c["one"] == Counter(train=1)
    assert c["two"] == Counter(train=1, test=1)
    assert c["three"] == Counter(train=2, test=1)
    assert c["four"]["test"] >= 1 and c["four"]["train"] >= 2
    assert result.single_image_classes == ["one"]
    assert result.classes_without_test_items == ["one"]


def test_exact_duplicates_are_never_split_and_are_reported():
    items = make_items({"a": 60, "b": 60})
    # Every fifth image of "a" is a byte-identical copy of the previous one; one copy sits in "b".
    items = [SplitItem(it.id, it.label, f"a-{i - 1}" if it.label == "a" and i % 5 == 0 and i else it.sha256)
             for i, it in enumerate(items)]
    items.append(SplitItem("b/copy-of-a7.jpg", "b", "a-7"))
    for seed in range(5):
        result = assign_splits(items, "stratified", [0.7, 0.15, 0.15], seed=seed)
        by_hash: dict[str, set] = {}
        for it in items:
            by_hash.setdefault(it.sha256, set()).add(result.assignment[it.id])
        assert all(len(splits) == 1 for splits in by_hash.values())
    assert ["a/0007.jpg", "b/copy-of-a7.jpg"] in result.conflicting_duplicates
    assert len(result.conflicting_duplicates) == 1
    assert ["a/0004.jpg", "a/0005.jpg"] in result.duplicate_groups
    assert len(result.duplicate_groups) == 12


def test_groups_stay_together_and_ratios_roughly_hold():
    rng = random.Random(7)
    items = []
    for g in range(60):
        label = "ab"[g % 2]
        for k in range(rng.randint(1, 6)):
            items.append(SplitItem(f"{label}/g{g:02d}-{k}.jpg", label, f"h{g}-{k}", group=f"product-{g}"))
    result = assign_splits(items, "stratified", [0.7, 0.15, 0.15], seed=11)
    for g in range(60):
        splits = {result.assignment[it.id] for it in items if it.group == f"product-{g}"}
        assert len(splits) == 1, g
    share = Counter(result.assignment.values())
    assert abs(share["train"] / len(items) - 0.7) < 0.1
    assert share["val"] > 0 and share["test"] > 0


def test_units_join_groups_and_duplicates_transitively():
    items = [
        SplitItem("x1", "a", "h1", group="g"),
        SplitItem("x2", "a", "h2", group="g"),
        SplitItem("x3", "a", "h2"),            # duplicate of x2, so in x1's unit too
        SplitItem("x4", "a", "h4"),
    ]
    assert build_units(items) == [[0, 1, 2], [3]]


def test_stratified_is_deterministic_and_independent_of_input_order():
    items = make_items({"a": 37, "b": 23, "c": 5})
    first = assign_splits(items, "stratified", [0.7, 0.15, 0.15], seed=5).assignment
    shuffled = items[:]
    random.Random(99).shuffle(shuffled)
    assert assign_splits(shuffled, "stratified", [0.7, 0.15, 0.15], seed=5).assignment == first
    assert assign_splits(items, "stratified", [0.7, 0.15, 0.15], seed=6).assignment != first


def test_class_disjoint_sorted_flowers_protocol():
    items = make_items({f"{k:03d}_flower": 3 for k in range(1, 103)})
    result = assign_splits(items, "classes", [0.5, 0.0, 0.5], seed=0, class_order="sorted")
    train = {it.label for it in items if result.assignment[it.id] == "train"}
    test = {it.label for it in items if result.assignment[it.id] == "test"}
    assert train == {f"{k:03d}_flower" for k in range(1, 52)}
    assert test == {f"{k:03d}_flower" for k in range(52, 103)}
    assert result.classes_without_test_items == []


def test_class_disjoint_shuffled_is_disjoint_and_seeded():
    items = make_items({f"c{k:02d}": 4 for k in range(20)})

    def classes_per_split(seed):
        result = assign_splits(items, "classes", [0.6, 0.2, 0.2], seed=seed, class_order="shuffled")
        per = {s: {it.label for it in items if result.assignment[it.id] == s} for s in ("train", "val", "test")}
        return per

    per = classes_per_split(1)
    assert [len(per[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert not (per["train"] & per["val"]) and not (per["train"] & per["test"]) and not (per["val"] & per["test"])
    assert classes_per_split(1) == per
    assert classes_per_split(2) != per
    assert per["train"] != {f"c{k:02d}" for k in range(12)}  # shuffled, not sorted


def test_class_disjoint_moves_classes_linked_by_a_duplicate_together():
    items = make_items({f"c{k}": 2 for k in range(4)})
    items.append(SplitItem("c3/copy.jpg", "c3", "c0-0"))  # c0 and c3 now share a unit
    result = assign_splits(items, "classes", [0.5, 0.0, 0.5], seed=0, class_order="sorted")
    assert result.assignment["c3/copy.jpg"] == result.assignment["c0/0000.jpg"] == "train"
    assert result.assignment["c3/0000.jpg"] == "train"


def test_bad_arguments_raise():
    items = make_items({"a": 3})
    with pytest.raises(ValueError, match="split method"):
        assign_splits(items, "random")
    with pytest.raises(ValueError, match="unique"):
        assign_splits(items + items[:1])
    with pytest.raises(ValueError, match="class_order"):
        assign_splits(items, "classes", class_order="alphabetical")


def test_crops_of_one_image_share_a_split_when_stratified_but_not_when_class_disjoint():
    # 40 photos, each cut into a shirt and a pants crop.
    items = [SplitItem(f"p{i}#{part}", part, sha256=f"h{i}{part}", source=f"p{i}.jpg")
             for i in range(40) for part in ("shirt", "pants")]
    stratified = assign_splits(items, method="stratified", ratios=(0.5, 0.0, 0.5), seed=1).assignment
    assert all(stratified[f"p{i}#shirt"] == stratified[f"p{i}#pants"] for i in range(40))
    assert set(stratified.values()) == {"train", "test"}
    assert len(build_units(items, join_sources=True)) == 40 and len(build_units(items)) == 80
    disjoint = assign_splits(items, method="classes", ratios=(0.5, 0.0, 0.5), seed=1).assignment
    # Class-disjoint: each class keeps to its own split, so the two crops of a photo part.
    assert {disjoint[f"p{i}#shirt"] for i in range(40)} != {disjoint[f"p{i}#pants"] for i in range(40)}
