"""Phase 3 distill mode end to end on tiny images: a student learns a teacher's space; phases 4 and 5 list it."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

import run as cli
from pipeline.config import load_config
from pipeline.training.distill_plan import compared_model_groups, distilled_models, teacher_entry
from tests.conftest import make_class_folder, tiny_mobilenet_weights

TEACHER = "mobilenet-a0.25-32-none"


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    images = make_class_folder(tmp / "images", n_classes=4, per_class=10, size=32)
    # The student starts from a weights file (real-but-tiny weights, as tests/serving's run): export accepts it.
    weights = tiny_mobilenet_weights(tmp / "student.weights.h5")
    config = {"name": "d", "runs_dir": str(tmp / "runs"), "reports_dir": str(tmp / "reports"),
              "data": {"source": str(images), "tfrecords_dir": str(tmp / "tfrecords"), "name": "tiny"},
              "extract": {"backbones": [
                  {"name": "mobilenet", "alpha": 0.25, "image_size": 32, "weights": "none"},
                  {"name": "mobilenet", "alpha": 0.25, "image_size": 32, "weights": str(weights),
                   "tag": "student32"}]},
              "evaluate": {"projections": ["pca"], "grid_queries": 0},
              "train": {"epochs": 3, "embedding_dim": 16, "n_classes_per_batch": 3, "n_samples_per_class": 3,
                        "steps_per_epoch": 3, "finetune_layers": 4, "learning_rate": 0.01,
                        "distill_label_loss": "supcon"}}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["--config", str(path)]
    assert cli.main(["phase0", *args]) == 0
    assert cli.main(["phase1", *args]) == 0
    assert cli.main(["phase2", *args]) == 0
    assert cli.main(["phase3", "--mode", "distill", "--teacher", TEACHER, *args]) == 0
    distill = ["--mode", "distill", "--teacher", TEACHER]   # phases 4 and 5 take phase 3's flags
    assert cli.main(["phase4", *distill, *args]) == 0
    assert cli.main(["phase5", *distill, *args]) == 0
    return tmp, path


def test_the_student_is_trained_against_the_teacher_and_recorded(distilled):
    tmp, _ = distilled
    out = tmp / "runs" / "d" / "train" / "student32" / "distill"
    summary = json.loads((out / "training.json").read_text())
    assert summary["mode"] == "distill" and summary["objective"] == "teacher"
    assert summary["teacher"]["spec"] == TEACHER and summary["teacher"]["dim"] == 256
    assert summary["projection"] is True, "16-d student, 256-d teacher: matched through a projection"
    assert summary["loss_config"]["label_loss"] == "supcon"
    speed = summary["speed"]
    assert speed["student_images_per_second"] > 0 and speed["teacher_images_per_second"] > 0
    assert (out / "embedding_model.keras").is_file() and (out / "saved_model").is_dir()
    history = pd.read_csv(out / "history.csv")
    assert history["loss"].iloc[-1] < history["loss"].iloc[0], "the student moves towards the teacher's space"


def test_phases_4_and_5_evaluate_and_compare_the_student(distilled):
    tmp, _ = distilled
    meta = json.loads((tmp / "runs" / "d" / "embeddings" / "student32+distill" / "meta.json").read_text())
    assert meta["trained"] and meta["loss"] == "distill" and meta["dim"] == 16
    rows = json.loads((tmp / "reports" / "d" / "comparison.json").read_text())["rows"]
    models = {(row["backbone"], row["loss"]) for row in rows}
    assert ("student32", "distill") in models and (TEACHER, "pretrained") in models


def test_a_distilled_student_exports_with_its_teacher_on_the_card(distilled):
    tmp, path = distilled
    assert cli.main(["export", "--run", "d", "--config", str(path), "--model", "student32+distill"]) == 0
    from pipeline.serving.bundle import open_bundle

    bundle = open_bundle(tmp / "runs" / "d" / "bundle")
    card = bundle.card
    bundle.close()
    assert card["source"]["tag"] == "student32+distill" and card["loss"] == "distill"
    assert card["training"]["mode"] == "distill" and card["training"]["teacher"] == TEACHER
    assert card["training"]["speed"]["student_images_per_second"] > 0
    assert card["export_check"]["max_abs_diff"] <= card["export_check"]["tolerance"]


def test_a_label_loss_through_a_classifier_is_a_one_line_error(distilled, capsys):
    _, path = distilled
    code = cli.main(["phase3", "--config", str(path), "--mode", "distill", "--teacher", TEACHER,
                     "--set", "train.distill_label_loss=arcface"])
    assert code == 1 and "error: train.distill_*: label_loss 'arcface' trains through a classifier" in \
        capsys.readouterr().err


def test_model_lists_under_distillation(tmp_path):
    from pipeline.config import BackboneConfig
    from pipeline.core.run_dir import backbone_tag

    teacher = BackboneConfig(name="mobilenet", image_size=96, params={"alpha": 0.25})
    config = load_config(None, ["train.mode=distill", f"train.teacher={backbone_tag(teacher)}+arcface"])
    config.extract.backbones.append(teacher)
    student = backbone_tag(config.extract.backbones[0])
    assert teacher_entry(config) == (backbone_tag(teacher), "arcface")
    assert distilled_models(config) == [(student, "distill")]
    assert compared_model_groups(config, "pretrained") == [
        (student, ["pretrained", "distill"]), (backbone_tag(teacher), ["pretrained", "arcface"])]
    with pytest.raises(Exception, match="needs a teacher"):
        load_config(None, ["train.mode=distill"])


@pytest.mark.parametrize("phase", ["phase4", "phase5", "all"])
def test_phases_4_and_5_take_the_distill_flags(phase):
    args = cli.build_parser().parse_args([phase, "--mode", "distill", "--teacher", "t224+arcface",
                                          "--student", "s128"])
    config = cli.config_from_args(args)
    assert (config.train.mode, config.train.teacher, config.train.student) == ("distill", "t224+arcface", "s128")
    with pytest.raises(SystemExit):   # training-only flags stay with phase 3
        cli.build_parser().parse_args(["phase4", "--epochs", "3"])


def test_an_ensemble_teacher_has_no_single_model_to_time():
    """An ensemble teacher (its members joined only by the export) is not rebuilt from a backbone named "ensemble":
    that crashed a finished distillation at its timing step (BENCHMARKS 19, the ensemble teacher)."""
    from pipeline.training.distill import teacher_model

    meta = {"trained": False, "backbone": {"name": "ensemble", "weights": "imagenet"},
            "ensemble": {"members": ["a", "b"], "combine": "concat", "weights": [1.0, 1.0]}}
    assert teacher_model({"model_file": None, "meta": meta}) is None
