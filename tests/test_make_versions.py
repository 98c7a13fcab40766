"""bench/make_versions.py on two tiny images: the manifest (path,label,text,group,role), versions that decode and
differ from their original, determinism under --seed, and one-line argument errors."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import make_versions


@pytest.fixture
def two_images(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "src" / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(tmp_path / "src" / name / "a.png")
    return tmp_path / "src"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_manifest_roles_groups_and_versions(two_images, tmp_path):
    manifest = make_versions.build(two_images, tmp_path / "out", per_class=1, versions=3, seed=0,
                                   prompt="a photo of a {label}")
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label", "text", "group", "role"] and len(rows) == 8
    assert [r["role"] for r in rows[:4]] == ["original", "moderate", "radical", "moderate"]
    assert {r["group"] for r in rows[:4]} == {"cat/a.png"} and rows[0]["text"] == "a photo of a cat"
    original = np.asarray(Image.open(manifest.parent / rows[0]["path"]).convert("RGB"), np.float32)
    assert (manifest.parent / rows[0]["path"]).read_bytes() == (two_images / "cat/a.png").read_bytes()
    for row in rows[1:4]:
        version = np.asarray(Image.open(manifest.parent / row["path"]).convert("RGB"), np.float32)
        assert version.shape == original.shape and np.abs(version - original).mean() > 5
    assert not list((tmp_path / "out").rglob("*.tmp*")), "no temporary file is left behind"


def test_the_same_seed_gives_the_same_set_and_another_seed_another(two_images, tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        make_versions.build(two_images, tmp_path / name, per_class=1, versions=2, seed=seed, prompt="{label}")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _files(tmp_path / "a") != _files(tmp_path / "c")


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_versions.main([str(tmp_path / "missing"), str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "source folder not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_versions.main([str(tmp_path), str(tmp_path / "out"), "--prompt", "no field"])
    assert "--prompt must contain {label}" in capsys.readouterr().err
