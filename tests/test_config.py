import pytest

from pipeline.config import ConfigError, load_config


def test_defaults_and_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ndata: {source: /imgs, split: classes}\nevaluate: {k: 7}\n")
    config = load_config(path, ["evaluate.k=3", "data.ratios=0.5,0.0,0.5", "extract.backbones.0.alpha=0.25",
                                "evaluate.gallery_splits=train,test"])
    assert config.name == "x" and config.data.source == "/imgs" and config.data.split == "classes"
    assert config.evaluate.k == 3 and config.data.ratios == [0.5, 0.0, 0.5]
    assert config.extract.backbones[0].alpha == 0.25
    assert config.evaluate.gallery_splits == ["train", "test"]


@pytest.mark.parametrize("override,match", [
    ("data.nope=1", "unknown setting"),
    ("evaluate.k=abc", "expected int"),
    ("data.split=random", "must be one of"),
    ("data.ratios=0.5,0.5,0.5", "summing to 1"),
    ("name=a/b", "run name"),
    ("extract.backbones.3.alpha=1", "only 1 backbone"),
])
def test_bad_settings_are_clear_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_unknown_yaml_key_and_missing_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {sauce: x}\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_load():
    from pathlib import Path
    for path in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        load_config(path)
