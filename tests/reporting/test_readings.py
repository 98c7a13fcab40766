"""The reports' sentences follow from every number they cite (issue 9 item 13): crafted metrics dicts, no run."""
from __future__ import annotations

import numpy as np

from pipeline.reporting.compare_view import answers, comparison_view, table_rows
from pipeline.reporting.formatting import best_flags, fmt_magnitude
from pipeline.reporting.readings import anisotropy_change, diagnostics_reading, equivalence_text, scoring_note
from pipeline.reporting.report import build_view


def row(p1: float, mapr: float, n: int) -> dict:
    return {"P@1": p1, "P@k": p1, "R@k": p1, "mAP": mapr, "MAP@R": mapr, "R-precision": mapr,
            "n_queries_evaluated": n, "n_queries_without_positive": 0}


def phase2_metrics(raw_p1: float, raw_mapr: float, n: int, unit_p1: float = 0.545, unit_mapr: float = 0.300) -> dict:
    return {"retrieval": {"unit/cosine": row(unit_p1, unit_mapr, n), "unit/euclidean": row(unit_p1, unit_mapr, n),
                          "raw/euclidean": row(raw_p1, raw_mapr, n)},
            "rankings_identical_unit": True, "topk_agreement_unit": 1.0}


# --------------------------------------------------------------------------- cosine vs raw euclidean

def test_opposite_moves_on_eleven_queries_do_not_conclude():
    # The reported case: MAP@R +0.013 while P@1 fell 0.182, on 11 queries.
    text = equivalence_text(phase2_metrics(raw_p1=0.545 - 0.182, raw_mapr=0.313, n=11))["raw"]
    assert "MAP@R 0.313 raw vs 0.300 unit/cosine (+0.013)" in text and "(-0.182)" in text
    assert "costs accuracy" not in text and "normalising helps:" not in text
    assert "only 11 scored queries" in text and "too few to conclude" in text and "disagree" in text


def test_opposite_moves_on_many_queries_say_the_metrics_disagree():
    text = equivalence_text(phase2_metrics(raw_p1=0.5, raw_mapr=0.35, n=5000))["raw"]
    assert "the metrics disagree" in text and "costs accuracy" not in text and "too few" not in text


def test_agreeing_moves_on_enough_queries_conclude_both_ways():
    worse = equivalence_text(phase2_metrics(raw_p1=0.4, raw_mapr=0.2, n=500))["raw"]
    assert "normalising helps" in worse
    better = equivalence_text(phase2_metrics(raw_p1=0.6, raw_mapr=0.35, n=500))["raw"]
    assert "normalising costs accuracy" in better
    same = equivalence_text(phase2_metrics(raw_p1=0.545, raw_mapr=0.3001, n=500))["raw"]
    assert "no measurable difference" in same


def test_a_raw_row_without_scores_is_not_called_missing():
    metrics = phase2_metrics(raw_p1=float("nan"), raw_mapr=float("nan"), n=0,
                             unit_p1=float("nan"), unit_mapr=float("nan"))
    text = equivalence_text(metrics)["raw"]
    assert "has no raw/euclidean row" not in text and "no query could be scored" in text
    del metrics["retrieval"]["raw/euclidean"]
    assert "this run has no raw/euclidean row" in equivalence_text(metrics)["raw"]


# --------------------------------------------------------------------------- diagnostics

def test_tiny_raw_norms_keep_their_digits_beside_the_reading(tmp_path):
    raw = {"n": 200, "dim": 256, "norm": {"mean": 1.2e-16, "std": 3.6e-17, "min": 5e-17, "max": 2.5e-16},
           "mean_pairwise_cosine": 0.3}
    unit = {"n": 200, "dim": 256, "norm": {"mean": 1.0, "std": 0.0, "min": 1.0, "max": 1.0}}
    reading = diagnostics_reading(unit, raw)
    assert "std/mean 0.30" in reading and "1.2e-16" in reading
    view = build_view(tmp_path, {"backbones": [{"tag": "b", "metrics": {"diagnostics": {"unit": unit, "raw": raw}}}]})
    norm_row = next(r for r in view["backbones"][0]["diagnostics"]["rows"] if r["label"].startswith("L2 norm: mean"))
    assert norm_row["values"] == ["1.000 ± 0.000", "1.2e-16 ± 3.6e-17"]
    assert fmt_magnitude(0.0) == "0.000" and fmt_magnitude(20.0) == "20.000"


def test_effective_rank_of_few_vectors_is_not_read_as_a_property_of_the_space():
    reading = diagnostics_reading({"n": 11, "dim": 256, "effective_rank": 8.0}, None)
    assert "few dimensions really used" not in reading
    assert "at most 10 with 11 vectors" in reading and "rough" in reading


# --------------------------------------------------------------------------- nothing to score

def test_scoring_note_says_why_there_is_nothing_to_score():
    labels = np.array([0, 1, 2])
    note = scoring_note(labels, labels, np.zeros(3, dtype=int), True, "test")
    assert note == "nothing to score: no query has a positive in the gallery: every test class has a single image"
    absent = scoring_note(np.array([5, 6]), np.array([0, 1]), np.zeros(2, dtype=int), False, "test")
    assert "none of the test classes appears in the gallery" in absent
    one_class = np.zeros(4, dtype=int)
    assert "trivially perfect" in scoring_note(one_class, one_class, np.full(4, 3), True, "test")
    assert scoring_note(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1]), np.ones(4, dtype=int), True, "test") is None


def test_report_shows_the_reason_instead_of_a_table_of_dashes(tmp_path):
    nan = float("nan")
    metrics = {"retrieval": {v: {**row(nan, nan, 0), "n_queries_without_positive": 3}
                             for v in ("unit/cosine", "raw/euclidean")},
               "scoring_note": "nothing to score: no query has a positive in the gallery: every test class has a "
                               "single image"}
    section = build_view(tmp_path, {"backbones": [{"tag": "b", "metrics": metrics}]})["backbones"][0]
    assert section["rows"] == [] and section["scoring_note"].startswith("Nothing to score")
    assert section["scoring_note"].endswith("single image.")


def test_a_small_sample_is_flagged_in_the_phase2_report(tmp_path):
    section = build_view(tmp_path, {"backbones": [{"tag": "b", "metrics": phase2_metrics(0.5, 0.3, 11)}]})
    assert "Only 11 queries were scored" in section["backbones"][0]["sample_note"]
    section = build_view(tmp_path, {"backbones": [{"tag": "b", "metrics": phase2_metrics(0.5, 0.3, 500)}]})
    assert section["backbones"][0]["sample_note"] == ""


# --------------------------------------------------------------------------- phase 5

def model(loss: str, cos: float, rank: float, mapr: float, n: int = 500, dim: int = 512) -> dict:
    diag = {"mean_pairwise_cosine": cos, "effective_rank": rank, "dim": dim, "intra_inter_distance_ratio": 0.8,
            "hubness_skew": 1.0}
    return {"backbone": "mobilenet", "loss": loss, "eval_tag": f"mobilenet+{loss}",
            "metrics": {"retrieval": {"unit/cosine": row(0.5, mapr, n), "unit/euclidean": row(0.5, mapr, n),
                                      "raw/euclidean": row(0.4, mapr - 0.05, n)},
                        "diagnostics": {"unit": diag, "raw": diag}, "clustering": {},
                        "protocol": {"k": 5, "n_queries": n, "query_split": "test", "gallery_splits": ["test"],
                                     "gallery_size": n, "leave_one_out": True},
                        "per_class": [{"class": "a", "MAP@R": mapr}]}}


def answer(qa: list[dict], start: str) -> str:
    return next(a["answer"] for a in qa if a["question"].startswith(start))


def test_a_wider_cone_with_collapsed_rank_is_mixed_not_yes():
    # The demo's arcface: mean cosine fell, effective rank 56.5 -> 5.6 of 512.
    qa = answers([model("pretrained", 0.45, 56.5, 0.34, dim=256), model("arcface", 0.05, 5.6, 0.60)])
    text = answer(qa, "Did anisotropy")
    assert text.startswith("Mixed:") and "dimensional collapse" in text and "56.5 → 5.6" in text
    assert anisotropy_change({"mean_pairwise_cosine": 0.45, "effective_rank": 56.5},
                             {"mean_pairwise_cosine": 0.05, "effective_rank": 5.6})["verdict"] == "mixed"


def test_anisotropy_yes_and_no_follow_both_measures():
    yes = answer(answers([model("pretrained", 0.45, 56.5, 0.34), model("triplet", 0.10, 80.0, 0.65)]), "Did")
    assert yes.startswith("Yes:") and "1 of 1" in yes
    no = answer(answers([model("pretrained", 0.45, 56.5, 0.34), model("triplet", 0.60, 30.0, 0.65)]), "Did")
    assert no.startswith("No:")
    both = answers([model("pretrained", 0.45, 56.5, 0.34), model("triplet", 0.10, 80.0, 0.65),
                    model("arcface", 0.05, 5.6, 0.60)])
    assert answer(both, "Did").startswith("Mixed:")


def test_phase5_answers_on_few_queries_say_they_cannot_conclude():
    qa = answers([model("pretrained", 0.45, 56.5, 0.34, n=11), model("triplet", 0.10, 80.0, 0.65, n=11)])
    for question in ("Which backbone", "Which loss", "Does cosine", "Do neighbours"):
        assert "Only 11 queries were scored: too few to conclude" in answer(qa, question), question


def test_no_loss_beating_the_baseline_is_not_called_the_most_discriminative():
    text = answer(answers([model("pretrained", 0.45, 56.5, 0.34), model("triplet", 0.4, 50.0, 0.30)]), "Which loss")
    assert text.startswith("No loss beat the pretrained baseline") and "-0.040" in text


def test_unscored_models_are_said_so_instead_of_crashing():
    nan = float("nan")
    models = [model("pretrained", 0.45, 56.5, nan, n=0), model("triplet", 0.4, 50.0, nan, n=0)]
    models[0]["metrics"]["scoring_note"] = "nothing to score: every test class has a single image"
    qa = answers(models)
    assert "No model could be scored: nothing to score" in answer(qa, "Which backbone")
    assert "could be scored" in answer(qa, "Which loss")


def test_one_best_rule_for_both_reports():
    assert best_flags([0.5, 0.7, None, 0.7004]) == [False, True, False, True]
    assert best_flags([0.5, 0.5]) == [False, False]          # all equal: no winner
    assert best_flags([0.9]) == [False]                      # a single row: nothing to beat
    models = [model("pretrained", 0.45, 56.5, 0.34), model("triplet", 0.1, 80.0, 0.65)]
    rows = table_rows(models)
    view = comparison_view("r", "now", "", models, rows, [], [], [], "bars.png")
    mapr = [r["cells"][4] for r in view["rows"]]
    assert [c["best"] for c in mapr] == best_flags([r["MAP@R"] for r in rows])
    assert sum(c["best"] for c in mapr) == 2 and mapr[3]["text"] == "0.650"
