"""The command line: sub-commands from the PHASES table, settings saved only once a phase succeeded,
mistakes reported in one line before TensorFlow is imported, and help that says what every flag does."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import run as cli
from pipeline.config import ConfigError, load_config
from pipeline.runner import PHASES, save_settings

REPO = Path(__file__).resolve().parents[1]


def _args(tmp_path: Path, run: str = "r") -> list[str]:
    return ["--run", run, "--set", f"runs_dir={tmp_path}/runs", "--set", f"reports_dir={tmp_path}/reports",
            "--set", f"data.tfrecords_dir={tmp_path}/tfrecords"]


def _saved_run(tmp_path: Path) -> Path:
    """A run whose phases 0-3 succeeded once with 64-px random-weights MobileNet-0.25 and the triplet loss."""
    config = load_config(None, ["name=r", f"runs_dir={tmp_path}/runs", f"reports_dir={tmp_path}/reports",
                                "extract.backbones.0.params.alpha=0.25", "extract.backbones.0.image_size=64",
                                "extract.backbones.0.weights=none", "train.losses=triplet"])
    return save_settings(config, ("data", "extract", "evaluate", "train"))


def _config_of(tmp_path: Path, *argv: str):
    return cli.config_from_args(cli.build_parser().parse_args([*argv, *_args(tmp_path)]))


def test_sub_commands_come_from_the_phases_table():
    parser = cli.build_parser()
    for name in [*PHASES, "all"]:
        assert parser.parse_args([name]).phase == name
    with pytest.raises(SystemExit):
        parser.parse_args(["phase9"])


@pytest.mark.parametrize("argv", [
    ["phase3", "--loss", "bogus"],
    ["phase3", "--set", "train.losses=foo"],
    ["phase1", "--image-size", "8"],
    ["phase1", "--image-size", "-5"],
    ["phase1", "--backbone-param", "alpha=wide"],
    ["phase2", "--set", "evaluate.k=0"],
    ["phase2", "--set", "train.losses=bogus"],   # a section phase 2 does not use is still checked
])
def test_a_failed_command_leaves_the_saved_settings_alone(tmp_path, capsys, argv):
    saved = _saved_run(tmp_path)
    before = saved.read_bytes()
    assert cli.main([*argv, *_args(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and saved.read_bytes() == before
    # The next command on the run starts from what worked, not from the rejected value.
    config = _config_of(tmp_path, "phase2")
    assert config.train.losses == ["triplet"] and config.evaluate.k == 5
    assert config.extract.backbones[0].artifact_tag() == "mobilenet-a0.25-64-none"


def test_a_phase_that_fails_at_run_time_saves_nothing(tmp_path):
    saved = _saved_run(tmp_path)
    before = saved.read_bytes()
    # No phase-0 output for this run: phase 1 stops (exit 1) and its --image-size is not kept.
    assert cli.main(["phase1", "--image-size", "96", *_args(tmp_path)]) == 1
    assert saved.read_bytes() == before


@pytest.mark.parametrize("source", ["empty", "missing"])
def test_a_failed_phase0_writes_no_run_config(tmp_path, source):
    (tmp_path / "empty").mkdir()
    assert cli.main(["phase0", "--source", str(tmp_path / source), *_args(tmp_path, "fresh")]) == 1
    assert not (tmp_path / "runs/fresh/config.yaml").exists()


def test_a_phase_saves_only_the_sections_it_used(tmp_path):
    saved = _saved_run(tmp_path)
    config = load_config(saved, ["evaluate.k=3", "train.epochs=2", "extract.batch_size=8"])
    save_settings(config, PHASES["phase2"].sections)
    written = yaml.safe_load(saved.read_text())
    assert written["evaluate"]["k"] == 3 and written["extract"]["batch_size"] == 8
    assert written["train"]["epochs"] == 30, "phase 2 does not use train.epochs: it is not saved"


def test_backbone_options_from_flags(tmp_path):
    (backbone,) = _config_of(tmp_path, "phase1", "--alpha", "0.5").extract.backbones
    assert backbone.params == {"alpha": 0.5}
    (backbone,) = _config_of(tmp_path, "phase1", "--backbone-param", "alpha=0.75").extract.backbones
    assert backbone.artifact_tag() == "mobilenet-a0.75-imagenet"
    both = _config_of(tmp_path, "phase1", "--backbone", "resnet50", "--backbone", "mobilenet", "--alpha", "0.25",
                      "--weights", "none")
    assert [b.artifact_tag() for b in both.extract.backbones] == ["resnet50-none", "mobilenet-a0.25-none"]
    for argv, match in ((["--backbone", "resnet50", "--alpha", "0.5"], "none of the backbones"),
                        (["--backbone-param", "alpha"], "KEY=VALUE"),
                        (["--backbone", "vgg99"], "unknown backbone")):
        with pytest.raises(ConfigError, match=match):
            _config_of(tmp_path, "phase1", *argv)


def _help(*argv: str, capsys) -> str:
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_describes_every_flag(capsys):
    text = _help("phase0", capsys=capsys)
    for flag in ("-v, --verbose log", "--split {stratified,classes} stratified:", "--seed SEED seed of the split",
                 "--limit-per-class N keep at most N images per class"):
        assert flag in text, flag
    assert "every backbone of the run" in _help("phase2", capsys=capsys)
    assert "--alpha VALUE MobileNet width multiplier" in _help("phase1", capsys=capsys)


def _run_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run.py"), *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_settings_errors_are_found_before_tensorflow_is_imported(tmp_path):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import run; rc = run.main(sys.argv[2:]); "
            "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'; sys.exit(rc)")
    for argv in (["phase1", "--image-size", "8"], ["phase0", "--config", str(tmp_path / "tab.yaml")],
                 ["phase3", "--loss", "bogus"]):
        (tmp_path / "tab.yaml").write_text("data:\n\tsource: x\n")
        done = subprocess.run([sys.executable, "-c", code, str(REPO), *argv, *_args(tmp_path)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr


def test_a_bad_loss_is_one_line_without_tensorflows_start_up_noise(tmp_path):
    done = _run_cli("phase3", "--loss", "bogus", *_args(tmp_path), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [done.stderr.strip()] and "unknown loss ['bogus']" in done.stderr, done.stderr
    assert not (tmp_path / "runs").exists()


def test_serving_tools_are_sub_commands_with_their_own_flags(capsys):
    from pipeline.runner import TOOLS

    parser = cli.build_parser()
    assert parser.parse_args(["export", "--run", "r"]).model == "best"
    assert parser.parse_args(["bundle", "remove", "--bundle", "b", "--ids", "a", "b"]).ids == ["a", "b"]
    assert parser.parse_args(["search", "--bundle", "b", "--text", "red dress"]).k == 10
    assert parser.parse_args(["infer", "--bundle", "b", "--queries", "q", "--output", "r.csv"]).batch_size == 32
    with pytest.raises(SystemExit):
        parser.parse_args(["search", "--bundle", "b", "--image", "q.jpg", "--text", "both"])
    for name in TOOLS:
        assert TOOLS[name].split(":")[0] in _help(name, capsys=capsys)
    assert "--filter COLUMN=VALUE keep items whose column equals the value" in _help("search", capsys=capsys)


def test_serving_tool_mistakes_are_found_before_tensorflow_is_imported(tmp_path):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import run; rc = run.main(sys.argv[2:]); "
            "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'; sys.exit(rc)")
    for argv in (["search", "--bundle", str(tmp_path / "none"), "--image", "q.jpg"],
                 ["infer", "--bundle", str(tmp_path / "none"), "--queries", ".", "--output", "r.csv"],
                 ["bundle", "remove", "--bundle", str(tmp_path / "none"), "--ids", "x"],
                 ["export", "--run", "nope", "--set", f"runs_dir={tmp_path}/runs"]):
        done = subprocess.run([sys.executable, "-c", code, str(REPO), *argv], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
