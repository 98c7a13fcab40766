"""Shared fixtures: tiny generated image folders and the location of ../shared."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EMBEDLAB_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test cleanly when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def make_class_folder(root: Path, n_classes: int = 4, per_class: int = 10, size: int = 32, seed: int = 0) -> Path:
    """Images whose class is visible: each class has its own base colour and stripe direction."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, 3)
        for i in range(per_class):
            img = np.tile(base, (size, size, 1)).astype(np.int16)
            stripes = (np.arange(size) // 4) % 2 == 0
            if c % 2:
                img[:, stripes] += 60
            else:
                img[stripes, :] += 60
            img += rng.integers(-20, 21, img.shape)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img_{i:03d}.png")
    return root


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    return make_class_folder(tmp_path / "images")
