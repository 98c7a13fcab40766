"""`--model best`: the highest test MAP@R among phase-2/4 evaluations, passing over what cannot be deployed."""
from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.core import atomic
from pipeline.core.errors import PhaseInputError
from pipeline.core.run_dir import RunDir
from pipeline.phases.export import choose_model


def _model(run_dir: RunDir, tag: str, map_r: float, split: str = "test", weights: str = "imagenet", **meta) -> None:
    atomic.write_json(run_dir.embeddings_dir(tag) / "meta.json",
                      {"weights_loaded": weights, "image_size": 32, "backbone": {"name": tag.split("-")[0]}, **meta})
    atomic.write_json(run_dir.eval_dir(tag) / "metrics.json", {"protocol": {"query_split": split},
                                                               "retrieval": {"unit/cosine": {"MAP@R": map_r,
                                                                                             "P@1": map_r}}})


def test_best_is_the_highest_test_map_at_r_that_can_be_deployed(tmp_path):
    run_dir = RunDir(load_config(None, ["name=r", f"runs_dir={tmp_path}"]))
    _model(run_dir, "mobilenet-imagenet", 0.50)
    _model(run_dir, "mobilenet-imagenet+triplet", 0.70, trained=True, base_tag="mobilenet-imagenet", loss="triplet")
    _model(run_dir, "mobilenet-imagenet+arcface", 0.75, trained=True, base_tag="mobilenet-imagenet", loss="arcface")
    _model(run_dir, "mobilenet-none", 0.90, weights="random")
    _model(run_dir, "resnet50-imagenet", 0.99, split="val")            # not a test-split score: not compared
    (run_dir.train_dir("mobilenet-imagenet", "triplet")).mkdir(parents=True)
    (run_dir.train_dir("mobilenet-imagenet", "triplet") / "embedding_model.keras").write_bytes(b"")
    tag, why = choose_model(run_dir, "best")
    assert tag == "mobilenet-imagenet+triplet"
    assert "0.7000" in why and "mobilenet-none" in why and "mobilenet-imagenet+arcface: phase 3 wrote no" in why
    assert choose_model(run_dir, "mobilenet+triplet")[0] == "mobilenet-imagenet+triplet"
    assert choose_model(run_dir, "mobilenet-imagenet")[0] == "mobilenet-imagenet"
    with pytest.raises(PhaseInputError, match="matches 2 of the run's models"):
        choose_model(run_dir, "mobilenet")
    with pytest.raises(PhaseInputError, match="cannot be exported: phase 3 wrote no"):
        choose_model(run_dir, "mobilenet+arcface")


def test_a_run_without_test_evaluations_says_what_to_run(tmp_path):
    run_dir = RunDir(load_config(None, ["name=r", f"runs_dir={tmp_path}"]))
    with pytest.raises(PhaseInputError, match="no test-split evaluation"):
        choose_model(run_dir, "best")


def test_a_random_initialised_trunk_is_not_exported(tmp_path):
    run_dir = RunDir(load_config(None, ["name=r", f"runs_dir={tmp_path}"]))
    emb = run_dir.embeddings_dir("mobilenet-a0.25-32-none")
    atomic.write_json(emb / "meta.json", {"weights_loaded": "random", "image_size": 32,
                                          "backbone": {"name": "mobilenet"}})
    atomic.write_json(run_dir.eval_dir("mobilenet-a0.25-32-none") / "metrics.json",
                      {"protocol": {"query_split": "test"}, "retrieval": {"unit/cosine": {"MAP@R": 0.5, "P@1": 0.5}}})
    with pytest.raises(PhaseInputError, match="for tests and timing, not deployment"):
        choose_model(run_dir, "best")
