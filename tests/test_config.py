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


def test_cli_backbone_keeps_configured_settings_and_phase3_flags(tmp_path):
    import run as cli

    config_path = tmp_path / "grid.yaml"
    config_path.write_text("extract:\n  backbones:\n    - {name: mobilenet, alpha: 0.25, image_size: 224}\n"
                           "    - {name: resnet50}\n")
    args = cli.build_parser().parse_args(["phase1", "--config", str(config_path), "--backbone", "mobilenet"])
    (backbone,) = cli.config_from_args(args).extract.backbones
    assert (backbone.name, backbone.alpha, backbone.image_size) == ("mobilenet", 0.25, 224)
    args = cli.build_parser().parse_args(["phase3", "--config", str(config_path), "--mixed-precision",
                                          "--positives", "group", "--hard-negatives", "0.25"])
    config = cli.config_from_args(args)
    assert config.train.mixed_precision and not config.extract.mixed_precision
    assert config.train.positives == "group" and config.train.hard_negative_share == 0.25
    both = cli.config_from_args(cli.build_parser().parse_args(["all", "--config", str(config_path),
                                                                "--mixed-precision"]))
    assert both.train.mixed_precision and both.extract.mixed_precision and len(both.extract.backbones) == 2
