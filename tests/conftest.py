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


def run_cli_without_tensorflow(argv: list[str]):
    """run.py's main(argv) in a fresh interpreter in which TensorFlow and Keras cannot be imported (a phase that
    must not need them fails there instead of loading them quietly). Returns the CompletedProcess."""
    import subprocess
    import sys

    code = ("import sys\n"
            "class NoTensorFlow:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('tensorflow', 'keras'):\n"
            "            raise ImportError('blocked by the test: ' + name)\n"
            "sys.meta_path.insert(0, NoTensorFlow())\n"
            "import run\n"
            f"sys.exit(run.main({argv!r}))\n")
    return subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)


def tiny_mobilenet_weights(path: Path, size: int = 32) -> Path:
    """A weights file for MobileNet α0.25 (random init, saved): a run that loads it has real-but-tiny weights,
    which export accepts (a random init is refused), and its conv weights fit any input size."""
    import keras

    keras.applications.MobileNet(alpha=0.25, include_top=False, weights=None,
                                 input_shape=(size, size, 3)).save_weights(path)
    return path
