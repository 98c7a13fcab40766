"""Phase 1's token cache format (`extract.tokens`): tokens.npy float16 (n, T, C) assembled from per-shard parts by
streaming into a memory map, read back memory-mapped and checked; the per-item scale that keeps float16 exact
enough; the fingerprint unchanged while tokens are off. The extraction itself (a tiny CLIP's class + patch tokens,
MobileNet's feature-map positions, aligned with items.csv rows) runs in tests/training/test_token_head.py, whose
runs also train on them; `make_group_manifest` and `assert_rows_match` serve both."""
from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.config import BackboneConfig, ExtractConfig
from pipeline.core.artifacts import extraction_fingerprint, load_tokens, remove_tokens, write_tokens
from pipeline.core.errors import PhaseInputError

TINY_CLIP = dict(vision_image_size=32, vision_patch_size=8, vision_hidden_dim=32, vision_num_layers=1,
                 vision_num_heads=2, vision_intermediate_dim=64, projection_dim=16, text_hidden_dim=32,
                 text_num_layers=1, text_num_heads=2, text_intermediate_dim=64, text_vocabulary_size=600)


def make_group_manifest(root: Path, n_classes: int = 4, groups_per_class: int = 3, versions: int = 3,
                        size: int = 32, seed: int = 0) -> Path:
    """A CSV manifest (path,label,text,group,role) of originals and their "generated" versions.

    Each group's original is a random pattern on its class colour; its versions are the original with a
    brightness shift, noise and a flip. Captions name the class; every fourth version has none.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_classes):
        base = rng.integers(40, 200, 3)
        for g in range(groups_per_class):
            pattern = rng.integers(-60, 61, (size // 4, size // 4, 3)).repeat(4, 0).repeat(4, 1)
            original = np.clip(base + pattern, 0, 255)
            group = f"c{c}g{g}"
            for v in range(versions + 1):
                image = original.astype(np.int16)
                if v:
                    image = image + rng.integers(-25, 26) + rng.integers(-15, 16, image.shape)
                    image = image[:, ::-1] if v % 2 else image
                name = f"{group}_{v}.png"
                Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / name)
                text = "" if v == 3 else f"a photo of class {c}"
                rows.append([name, f"class_{c}", text, group, "original" if v == 0 else "generated"])
    manifest = root / "items.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["path", "label", "text", "group", "role"], *rows])
    return manifest


def assert_rows_match(derived, raw):
    """Row i of `derived` points where row i of `raw` does (float16 rounding aside), and closer than to any
    other row (the versions of one original are near-duplicates, so the margin is small but must hold)."""
    a = np.asarray(derived, np.float64) / np.linalg.norm(derived, axis=1, keepdims=True)
    b = np.asarray(raw, np.float64) / np.linalg.norm(raw, axis=1, keepdims=True)
    similarity = a @ b.T
    assert np.diag(similarity).min() > 0.9999
    np.testing.assert_array_equal(similarity.argmax(axis=1), np.arange(len(raw)))


def test_parts_are_streamed_into_one_memory_mapped_file(tmp_path):
    rng = np.random.default_rng(0)
    parts, arrays = [], []
    for i, n in enumerate((5, 1, 7)):
        array = rng.normal(size=(n, 3, 4)).astype(np.float16)
        np.save(tmp_path / f"part{i}.tokens.npy", array)
        parts.append(tmp_path / f"part{i}.tokens.npy")
        arrays.append(array)
    assert write_tokens(tmp_path, parts) == (13, 3, 4)
    meta = {"tokens": {"file": "tokens.npy", "shape": [13, 3, 4], "dtype": "float16"}}
    tokens = load_tokens(tmp_path, 13, meta)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.float16 and not tokens.flags.writeable
    np.testing.assert_array_equal(tokens, np.concatenate(arrays))
    assert not list(tmp_path.glob(".tokens*"))            # no temporary file left behind
    assert load_tokens(tmp_path, 13, {"tokens": None}) is None
    with pytest.raises(PhaseInputError, match="tokens.npy is float16 \\(13, 3, 4\\)"):
        load_tokens(tmp_path, 12, meta)
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 5), np.float16))
    with pytest.raises(PhaseInputError, match="disagree in shape"):
        write_tokens(tmp_path, [parts[0], tmp_path / "bad.npy"])
    remove_tokens(tmp_path)
    with pytest.raises(PhaseInputError, match="tokens.npy is missing"):
        load_tokens(tmp_path, 13, meta)


def test_each_item_is_scaled_to_a_peak_of_one_in_float16():
    from models.heads import TokenScale

    rng = np.random.default_rng(1)
    raw = rng.normal(size=(3, 5, 8)).astype(np.float32) * np.array([1e-17, 1.0, 300.0], np.float32)[:, None, None]
    raw[1] = 0.0
    scaled = np.asarray(TokenScale()(raw))
    assert scaled.dtype == np.float16
    np.testing.assert_array_equal(scaled[1], 0.0)
    for i in (0, 2):
        expected = raw[i] / np.abs(raw[i]).max()
        np.testing.assert_allclose(scaled[i].astype(np.float32), expected, atol=1e-3)
        assert np.abs(scaled[i]).max() == 1.0
    # float16 on the raw values would have lost the first item entirely.
    assert not np.any(raw[0].astype(np.float16))


def test_the_fingerprint_changes_only_when_tokens_are_on():
    dataset = {"fingerprint": "d"}
    backbone = BackboneConfig(name="mobilenet", weights="none", params={"alpha": 0.25})
    off, on = ExtractConfig(), ExtractConfig(tokens=True)
    # The settings as the code before the field had them.
    before_tokens_existed = SimpleNamespace(splits=off.splits, dtype=off.dtype, index=off.index,
                                            write_json=off.write_json)
    assert extraction_fingerprint(dataset, backbone, off) == extraction_fingerprint(dataset, backbone,
                                                                                     before_tokens_existed)
    assert extraction_fingerprint(dataset, backbone, on) != extraction_fingerprint(dataset, backbone, off)
