"""The groups section's view and readings (pipeline/reporting/group_view.py, readings.auc_reading /
difference_reading) and phase 5's group columns (compare_view): every sentence follows from its numbers."""
from __future__ import annotations

import copy

from pipeline.reporting.compare_view import comparison_view, group_rows, table_rows
from pipeline.reporting.group_view import group_view
from pipeline.reporting.readings import auc_reading, difference_reading


def _auc(value, low, high, n=300):
    return {"auc": value, "ci95": [low, high], "se": 0.01, "n_positive": n, "n_negative": 5 * n}


def _groups(n_groups=60, auc=(0.8, 0.75, 0.85)):
    direction = {"R@1": 0.5, "R@5": 0.8, "R@10": 0.9, "MAP@R": 0.4, "mAP": 0.45, "mean_rank": 3.2, "median_rank": 2.0,
                 "n_queries": n_groups, "gallery_size": 4 * n_groups, "n_queries_evaluated": n_groups,
                 "n_queries_without_positive": 0}
    cosine = {"n": 120, "mean": 0.8, "std": 0.1, "median": 0.8, "q10": 0.7, "q90": 0.9}
    return {
        "protocol": {"n_groups": n_groups, "n_versions": 4 * n_groups, "gallery_versions": 4 * n_groups,
                     "gallery_originals": n_groups, "left_out": {"groups_without_original": 2},
                     "bootstrap_samples": 200},
        "retrieval": {"original_to_versions": direction, "version_to_original": {**direction, "n_queries": 240}},
        "closeness": {
            "measures": {m: {"versions": cosine, "random": {**cosine, "mean": 0.5}, "same_class": cosine}
                         for m in ("cosine", "mse", "mae")},
            "auc": {kind: {m: _auc(*auc) for m in ("cosine", "mse", "mae")} for kind in ("random", "same_class")},
            "per_role": [{"role": "moderate", "cosine": cosine, "mse_mean": 0.001, "mae_mean": 0.02,
                          "auc": _auc(0.95, 0.92, 0.97)},
                         {"role": "radical", "cosine": {**cosine, "mean": 0.5}, "mse_mean": 0.003, "mae_mean": 0.04,
                          "auc": _auc(0.49, 0.44, 0.55)}],
            "per_class": [{"class": "shoes", "cosine": cosine, "auc": 0.7}], "negatives_per_version": 5},
        "neighbourhood": {"k": 5, "original_vs_version": {"mean": 0.2, "n_pairs": 240},
                          "random_pairs": {"mean": 0.02, "n_pairs": 1200},
                          "before_after": {"mean": 0.4, "median": 0.4, "n_items": 300, "base": "mobilenet"}},
        "plots": {}, "grids": [], "notes": [],
    }


def test_readings_follow_the_intervals():
    assert "closer to their originals" in auc_reading("random pairs", _auc(0.8, 0.75, 0.85), 60)
    assert "further from their originals" in auc_reading("random pairs", _auc(0.3, 0.25, 0.35), 60)
    assert "does not tell" in auc_reading("random pairs", _auc(0.52, 0.45, 0.6), 60)
    assert "too few groups" in auc_reading("random pairs", _auc(0.9, 0.85, 0.95), 12)
    first, second = {"n": 100, "mean": 0.84, "std": 0.07}, {"n": 100, "mean": 0.52, "std": 0.15}
    assert "a higher than b by more than two standard errors" in difference_reading("cosine", "a", "b", first, second)
    assert "no difference" in difference_reading("cosine", "a", "b", first, {**second, "mean": 0.835})


def test_group_view_tables_and_readings():
    view = group_view({"protocol": {"query_split": "test"}, "groups": _groups()}, None)
    assert [r["name"] for r in view["retrieval"]] == ["original → its versions", "version → its original"]
    assert view["retrieval"][0]["cells"][:2] == ["0.500", "0.800"] and view["retrieval"][0]["cells"][5] == "3.2"
    assert view["measures"][0]["auc"] == ["0.800 (0.750–0.850)"] * 2
    readings = " ".join(view["readings"])
    assert "Versions vs random pairs: AUC 0.800" in readings and "closer to their originals" in readings
    assert "Radical versions vs random pairs: AUC 0.490" in readings and "does not tell radical versions" in readings
    assert "2 groups without an original left out." in view["notes"]
    assert any("keeps 0.400 of its k = 5" in line for line in view["neighbourhood"])
    assert group_view({"groups": {"note": "nothing to score"}}, None) == {"note": "nothing to score"}
    assert group_view({}, None) is None


def test_phase_5_gets_group_columns_only_for_runs_with_groups(tmp_path):
    from pipeline.reporting.compare_view import render_comparison

    retrieval = {v: {"P@1": 0.5, "P@k": 0.4, "R@k": 0.8, "mAP": 0.4, "MAP@R": 0.3, "R-precision": 0.35,
                     "n_queries_evaluated": 100} for v in ("unit/cosine", "raw/euclidean")}
    base = {"retrieval": retrieval, "diagnostics": {"unit": {}, "raw": {}}, "protocol": {"k": 5}}
    plain = [{"backbone": "b", "loss": "pretrained", "metrics": base}]
    assert "group R@1" not in table_rows(plain)[0] and group_rows(plain) == []
    trained = copy.deepcopy(base)
    trained["groups"] = _groups(auc=(0.9, 0.88, 0.92))
    models = [plain[0], {"backbone": "b", "loss": "triplet", "metrics": trained}]
    rows = table_rows(models)
    cosine = [r for r in rows if r["variant"] == "unit/cosine"]
    assert cosine[0]["group AUC"] is None and cosine[1]["group AUC"] == 0.9 and cosine[1]["group R@1"] == 0.5
    assert all(r["group MAP@R"] is None for r in rows if r["variant"] != "unit/cosine")
    view = comparison_view("r", "now", "", models, rows, [], [], [], "bars.png")
    assert view["group_columns"] == ["group R@1", "group MAP@R", "group AUC"]
    assert [r["loss"] for r in view["group_rows"]] == ["triplet"] and view["group_rows"][0]["kept"] == "0.400"
    assert view["group_rows"][0]["auc"][0] == "0.900 (0.880–0.920)"
    html = render_comparison(tmp_path, view).read_text()
    assert "<th>group AUC</th>" in html and "Originals and their versions" in html and "0.900 (0.880–0.920)" in html


def test_the_dataset_section_counts_roles():
    from pipeline.reporting.dataset_view import dataset_view

    roles = {"with_role": 12, "roles": {"moderate": 4, "original": 4, "radical": 4}, "n_groups": 5,
             "n_groups_with_one_original": 4, "n_groups_without_original": 1, "n_roles_without_group": 0}
    facts = dict(dataset_view({"name": "d", "roles": roles})["facts"])
    assert facts["roles"] == "moderate 4, original 4, radical 4" and facts["groups with one original"] == "4 of 5"
    assert facts["groups without an original"] == "1" and "roles without a group" not in facts
    assert "roles" not in dict(dataset_view({"name": "d", "roles": {"with_role": 0}})["facts"])
