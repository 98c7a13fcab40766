"""Phase 0's texts: missing (empty, NaN-like, whitespace) and over-long texts counted and kept, class-name
prompts, template errors before any work, and the settings that change content in the dataset's key."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, DataConfig, RunConfig, load_config, validate
from pipeline.core.artifacts import dataset_settings_key
from pipeline.data.validate import class_prompt, missing_text_reason
from pipeline.phases.ingest import compute_fingerprint, run_ingest

TEXTS = {
    "cat/00.png": "a grey cat on a sofa",
    "cat/01.png": "",
    "cat/02.png": "nan",
    "cat/03.png": "   \t ",
    "dog/00.png": "None",
    "dog/01.png": "x" * 60,
    "dog/02.png": "a dog",
    "dog/03.png": "NULL",
}


def _manifest(tmp_path: Path, texts: dict[str, str] = TEXTS) -> Path:
    rng = np.random.default_rng(0)
    for rel in texts:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / rel)
    path = tmp_path / "items.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "text"])
        for rel, text in texts.items():
            writer.writerow([rel, rel.split("/")[0].replace("dog", "hot_dog"), text])
    return path


def _config(source: Path, tmp_path: Path, **data) -> RunConfig:
    return RunConfig(data=DataConfig(source=str(source), tfrecords_dir=str(tmp_path / "tfr"), workers=1,
                                     ratios=[0.5, 0.0, 0.5], max_text_chars=50, **data),
                     runs_dir=str(tmp_path / "runs"))


def _stored_texts(out: Path) -> dict[str, str]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
        return {r["id"]: r["text"] for r in csv.DictReader(f)}


def test_missing_and_over_long_texts_are_counted_and_kept(tmp_path):
    out = run_ingest(_config(_manifest(tmp_path), tmp_path))
    summary = json.loads((out / "dataset.json").read_text())
    texts = summary["texts"]
    assert summary["n_images"] == 8, "items without text are kept"
    assert texts["with_text"] == 3 and texts["empty"] == 5
    assert texts["missing_in_source"] == {"NaN-like": 3, "empty": 1, "whitespace only": 1}
    assert texts["over_long"] == 1 and texts["over_long_examples"] == ["dog/01.png"] and texts["from_prompt"] == 0
    stored = _stored_texts(out)
    assert stored["cat/02.png"] == stored["cat/03.png"] == stored["dog/00.png"] == stored["dog/03.png"] == ""
    assert stored["dog/01.png"] == "x" * 60, "over-long texts are kept whole"
    assert stored["cat/00.png"] == "a grey cat on a sofa"


def test_prompts_fill_missing_texts_or_replace_all(tmp_path):
    source = _manifest(tmp_path)
    out = run_ingest(_config(source, tmp_path, text_prompt="a photo of a {label}"))
    stored = _stored_texts(out)
    assert stored["cat/01.png"] == "a photo of a cat" and stored["dog/03.png"] == "a photo of a hot dog"
    assert stored["cat/00.png"] == "a grey cat on a sofa"
    texts = json.loads((out / "dataset.json").read_text())["texts"]
    assert texts["from_prompt"] == 5 and texts["with_text"] == 8 and texts["empty"] == 0
    assert texts["missing_in_source"] == {"NaN-like": 3, "empty": 1, "whitespace only": 1}

    every = run_ingest(_config(source, tmp_path, text_prompt="{label}!", text_prompt_mode="all"))
    assert every != out, "a prompt changes the content: another dataset folder"
    assert set(_stored_texts(every).values()) == {"cat!", "hot dog!"}
    assert json.loads((every / "dataset.json").read_text())["texts"]["from_prompt"] == 8


def test_text_settings_enter_the_key_and_fingerprint_only_where_they_matter(tmp_path):
    plain, prompted = DataConfig(source="x"), DataConfig(source="x", text_prompt="a {label}")
    assert dataset_settings_key(plain) == dataset_settings_key(DataConfig(source="x", max_text_chars=5))
    assert dataset_settings_key(plain) != dataset_settings_key(prompted)
    assert dataset_settings_key(prompted) != dataset_settings_key(
        DataConfig(source="x", text_prompt="a {label}", text_prompt_mode="all"))
    from pipeline.data.sources import SourceItem

    without = [SourceItem(id="a", path="a", label_name="c")]
    with_text = [SourceItem(id="a", path="a", label_name="c", text="t")]
    # Sources without texts (folders, built-ins) keep their fingerprints whatever the text settings.
    assert compute_fingerprint(plain, without) == compute_fingerprint(DataConfig(source="x", max_text_chars=5),
                                                                       without)
    assert compute_fingerprint(plain, with_text) != compute_fingerprint(DataConfig(source="x", max_text_chars=5),
                                                                         with_text)


@pytest.mark.parametrize("template, message", [
    ("a photo of a {label} in {color}", "found {color}"),
    ("a photo", "must name the class as {label}"),
    ("a photo of a {label", "not a valid template"),
    ("{}", "found {}"),
])
def test_bad_templates_are_one_line_config_errors(template, message):
    config = RunConfig(data=DataConfig(text_prompt=template))
    with pytest.raises(ConfigError, match=message) as err:
        validate(config)
    assert "\n" not in str(err.value) and "data.text_prompt" in str(err.value)
    with pytest.raises(ConfigError, match="extract.zero_shot_prompt"):
        load_config(overrides=[f"extract.zero_shot_prompt={template}"])
    with pytest.raises(ConfigError, match="text_prompt_mode"):
        load_config(overrides=["data.text_prompt_mode=some"])


def test_text_rules():
    assert [missing_text_reason(t) for t in ("", " ", "NaN", " none ", "<NA>", "n/a", "Nancy", "0")] == \
        ["empty", "whitespace only", "NaN-like", "NaN-like", "NaN-like", "NaN-like", "", ""]
    assert class_prompt("a photo of a {label}", "ankle_boot") == "a photo of a ankle boot"
    assert class_prompt("{{{label}}}", "x") == "{x}"
