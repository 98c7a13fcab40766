import pytest

from pipeline.config import ConfigError, load_config


def test_defaults_and_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ndata: {source: /imgs, split: classes}\nevaluate: {k: 7}\n")
    config = load_config(path, ["evaluate.k=3", "data.ratios=0.5,0.0,0.5", "extract.backbones.0.alpha=0.25",
                                "evaluate.gallery_splits=train,test"])
    assert config.name == "x" and config.data.source == "/imgs" and config.data.split == "classes"
    assert config.evaluate.k == 3 and config.data.ratios == [0.5, 0.0, 0.5]
    assert config.extract.backbones[0].params["alpha"] == 0.25
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
    assert (backbone.name, backbone.params["alpha"], backbone.image_size) == ("mobilenet", 0.25, 224)
    args = cli.build_parser().parse_args(["phase3", "--config", str(config_path), "--mixed-precision",
                                          "--positives", "group", "--hard-negatives", "0.25"])
    config = cli.config_from_args(args)
    assert config.train.mixed_precision and not config.extract.mixed_precision
    assert config.train.positives == "group" and config.train.hard_negative_share == 0.25
    both = cli.config_from_args(cli.build_parser().parse_args(["all", "--config", str(config_path),
                                                                "--mixed-precision"]))
    assert both.train.mixed_precision and both.extract.mixed_precision and len(both.extract.backbones) == 2


# --------------------------------------------------------------------------- backbone options


def test_configs_that_wrote_alpha_beside_the_fields_load_with_the_same_tags_and_fingerprints(tmp_path):
    from pathlib import Path

    from pipeline.core.run_dir import backbone_tag

    demo = load_config(Path(__file__).parents[1] / "configs" / "demo.yaml")
    (backbone,) = demo.extract.backbones
    assert backbone.params == {"alpha": 0.25}
    assert backbone_tag(backbone) == "mobilenet-a0.25-96-imagenet"
    # A run folder's config.yaml as earlier versions saved it: `alpha` on every backbone.
    saved = tmp_path / "config.yaml"
    saved.write_text("extract:\n  backbones:\n"
                     "  - {name: mobilenet, weights: imagenet, weights_fallback: random, image_size: 96, alpha: 0.25,"
                     " tag: ''}\n"
                     "  - {name: resnet50, weights: imagenet, weights_fallback: error, image_size: 0, alpha: 1.0,"
                     " tag: ''}\n")
    mobilenet, resnet = load_config(saved).extract.backbones
    assert backbone_tag(mobilenet) == "mobilenet-a0.25-96-imagenet" and backbone_tag(resnet) == "resnet50-imagenet"
    assert resnet.params == {}
    # Fingerprints see the fields as they were, so finished phase-1 outputs stay up to date.
    assert mobilenet.fingerprint_fields() == {"name": "mobilenet", "weights": "imagenet", "weights_fallback": "random",
                                              "image_size": 96, "alpha": 0.25, "tag": ""}
    assert resnet.fingerprint_fields() == {"name": "resnet50", "weights": "imagenet", "weights_fallback": "error",
                                           "image_size": 0, "alpha": 1.0, "tag": ""}


def test_backbone_options_as_params_or_beside_the_fields():
    config = load_config(None, ["extract.backbones.0.params.alpha=0.5"])
    assert config.extract.backbones[0].params == {"alpha": 0.5}
    config = load_config(None, ["extract.backbones.0.params={alpha: 0.75}"])
    assert config.extract.backbones[0].params == {"alpha": 0.75}
    default = load_config(None).extract.backbones[0]
    assert default.params == {"alpha": 1.0}, "defaults are filled in, so the saved config.yaml says them"
    # A random network's seed enters its fingerprint; pretrained weights have none.
    random = load_config(None, ["extract.backbones.0.weights=none", "extract.backbones.0.init_seed=3"])
    assert random.extract.backbones[0].fingerprint_fields()["init_seed"] == 3
    assert "init_seed" not in default.fingerprint_fields()


@pytest.mark.parametrize("override,match", [
    ("extract.backbones.0.image_size=8", r"image_size must be at least 32 px .*got 8"),
    ("extract.backbones.0.image_size=-5", r"image_size must be at least 32 px .*got -5"),
    ("extract.backbones.0.name=vgg99", "unknown backbone 'vgg99'"),
    ("extract.backbones.0.params.width=2", r"no parameter\(s\) \['width'\]"),
    ("extract.backbones.0.alpha=wide", "expects a float"),
    ("extract.backbones.0.alpha=0.3", "only for alpha 0.25/0.5/0.75/1.0"),
    ("extract.backbones.0.params=[1, 2]", "expected a mapping"),
    ("evaluate.k=[", "not a valid value"),
    ("train.losses=", "train.losses is empty"),
    ("train.n_samples_per_class=1", "at least 2"),
])
def test_bad_backbone_and_training_settings_fail_before_any_work(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_unknown_loss_names_are_config_errors():
    from pipeline.config import validate_losses

    config = load_config(None, ["train.losses=triplet,bogus"])
    with pytest.raises(ConfigError, match=r"unknown loss \['bogus'\]"):
        validate_losses(config)


@pytest.mark.parametrize("text,line", [
    ("name: x\ndata:\n\tsource: y\n", 3),           # tab-indented
    ("name: x\ndata: {source: [a, b}\n", 2),        # malformed
    ("name: x\n  extract: 1\n", 2),                 # bad indentation
])
def test_malformed_yaml_is_one_line_naming_file_and_line(tmp_path, text, line):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}, line {line}")
    if "\t" in text:
        assert "tab" in message
