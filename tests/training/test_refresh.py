"""Hard negatives refreshed from the model being trained: mining (vs brute force), the segmented batch
stream, the refresh itself, resume, and both training modes."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.train_config import HardNegativesConfig
from pipeline.training import mining
from pipeline.training.mining import changed_negatives, mine_hard_negatives, mix_random_negatives
from pipeline.training.refresh import HardNegativeRefresh, NegativeTables, group_codes
from pipeline.training.sampler import hard_negative_batch_indices, refreshed_batch_indices
from pipeline.phases.train import run_train
from tests.training.test_train import TAG, _Interrupt, make_config, write_phase1


def brute_force(embeddings, keys, groups, n_negatives, grid=True):
    """Per row, its other-key, other-group rows by decreasing cosine (of grid-rounded unit vectors with `grid`,
    in float64 otherwise), ties to the lower row; -1 pads."""
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-30)
    if grid:
        unit = np.rint(unit * 2048).astype(np.int64)
    out = np.full((len(unit), n_negatives), -1, dtype=np.int64)
    for i in range(len(unit)):
        ok = [j for j in range(len(unit)) if keys[j] != keys[i] and not (groups[i] >= 0 and groups[j] == groups[i])]
        ranked = sorted(ok, key=lambda j: (-(unit[i] @ unit[j]), j))[:n_negatives]
        out[i, :len(ranked)] = ranked
    return out


def grouped_data(seed=0, n=160, dim=16):
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(n, dim)).astype(np.float32)
    keys = rng.integers(0, 12, size=n)
    groups = np.where(rng.random(n) < 0.6, rng.integers(0, 20, size=n), -1)
    return embeddings, keys, groups


@pytest.mark.parametrize("n_negatives", [1, 5, 12])
def test_exact_mining_excludes_same_key_and_same_group_as_brute_force(n_negatives):
    embeddings, keys, groups = grouped_data()
    table, info = mine_hard_negatives(embeddings, keys, n_negatives, groups=groups, chunk_size=37)
    assert info == {"method": "exact", "n_random": 0}
    np.testing.assert_array_equal(table, brute_force(embeddings, keys, groups, n_negatives))


def test_faiss_mining_matches_brute_force_and_fills_short_rows_exactly():
    embeddings, keys, groups = grouped_data(seed=1)
    table, info = mine_hard_negatives(embeddings, keys, 8, groups=groups, faiss_above=0)
    assert info["method"] == "faiss"
    # FAISS ranks the same grid-rounded vectors; ties aside, the lists are the brute-force ones.
    expected = brute_force(embeddings, keys, groups, 8)
    assert (table == expected).mean() > 0.98
    for row in range(len(table)):
        listed = table[row][table[row] >= 0]
        assert not np.isin(keys[listed], [keys[row]]).any()
        assert groups[row] < 0 or not (groups[listed] == groups[row]).any()


def test_random_negatives_are_true_negatives_distinct_and_seeded():
    embeddings, keys, groups = grouped_data(seed=2)
    table, info = mine_hard_negatives(embeddings, keys, 10, groups=groups, random_share=0.4, seed=[3, 1])
    assert info["n_random"] == 4
    hard = brute_force(embeddings, keys, groups, 10)
    np.testing.assert_array_equal(table[:, :6], hard[:, :6])
    for row in range(len(table)):
        assert len(set(table[row])) == 10 and (table[row] >= 0).all()
        assert not (keys[table[row]] == keys[row]).any()
        assert groups[row] < 0 or not (groups[table[row]] == groups[row]).any()
    again, _ = mine_hard_negatives(embeddings, keys, 10, groups=groups, random_share=0.4, seed=[3, 1])
    np.testing.assert_array_equal(table, again)
    # A row with fewer true negatives than slots keeps -1 where nothing is left.
    tiny = mix_random_negatives(np.array([[1, -1], [0, -1], [0, 1]]), np.array([0, 1, 1]), 1,
                                np.random.default_rng(0))
    assert tiny[0, 1] == 2 and tiny[1, 1] == -1


def test_changed_negatives_counts_new_entries_per_row():
    old = np.array([[1, 2, 3], [4, 5, -1]])
    assert changed_negatives(old, np.array([[3, 2, 1], [4, 6, 7]])) == 2
    assert changed_negatives(None, np.array([[1, -1]])) == 1


def test_group_codes():
    items = pd.DataFrame({"group": ["a", "", "b", "a", None]})
    np.testing.assert_array_equal(group_codes(items, np.arange(5)), [1, -1, 2, 1, -1])
    assert group_codes(pd.DataFrame({"group": ["", ""]}), np.arange(2)) is None


# --------------------------------------------------------------------------- the segmented batch stream

def _tables(n=60, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), 6)
    embeddings = rng.normal(size=(n, 8))
    first = mine_hard_negatives(embeddings, labels, 4)[0]
    second = mine_hard_negatives(rng.normal(size=(n, 8)), labels, 4)[0]
    return labels, {0: first, 1: second}


def test_first_table_draws_the_once_mined_stream_and_resume_needs_only_the_table_in_force():
    labels, tables = _tables()
    stream = refreshed_batch_indices(labels, tables.get, 5, 0.5, 4, 3, seed=7)
    batches = [b for b in itertools.islice(stream, 12)]
    once = hard_negative_batch_indices(labels, tables[0], 0.5, 4, 3, seed=7)
    for got, expected in zip(batches[:5], once):
        np.testing.assert_array_equal(got, expected)
    assert len(batches) == 10, "the stream ends where no table exists"
    # The second table's batches differ from what the first would have drawn, and follow its hard negatives.
    # (P=4, K=3: slot 1 starts at position 3 and holds the anchor's top negative of the table in force.)
    assert all(b[3] == tables[1][b[0]][0] for b in batches[5:])
    # Resuming at batch 7 with only table 1 gives batches 7, 8, 9 again.
    resumed = list(refreshed_batch_indices(labels, {1: tables[1]}.get, 5, 0.5, 4, 3, seed=7, skip_batches=7))
    for got, expected in zip(resumed, batches[7:], strict=True):
        np.testing.assert_array_equal(got, expected)


def test_negative_tables_wait_for_a_table_and_end_when_closed():
    import threading

    tables = NegativeTables(0, np.zeros((2, 1), dtype=np.int64))
    got = []
    reader = threading.Thread(target=lambda: got.append(tables.table_for(1)))
    reader.start()
    tables.publish(1, np.ones((2, 1), dtype=np.int64))
    reader.join(timeout=5)
    assert got and (got[0] == 1).all()
    tables.close()
    assert tables.table_for(5) is None


def test_a_refresh_replaces_the_table_when_the_model_changes():
    labels, _ = _tables()
    rng = np.random.default_rng(4)
    current = {"embeddings": rng.normal(size=(60, 8))}
    initial = mine_hard_negatives(current["embeddings"], labels, 4)[0]
    settings = make_config(Path("/unused"), hard_negative_share=0.5, hard_negatives_per_item=4,
                           hard_negatives=HardNegativesConfig(source="current", refresh_every=1)).train
    refresh = HardNegativeRefresh(NegativeTables(0, initial), lambda: current["embeddings"], labels, None, settings)
    same = refresh.refresh(1)
    assert same["changed"] == 0, "the same model mines the same table"
    current["embeddings"] = rng.normal(size=(60, 8))
    moved = refresh.refresh(2)
    number, table = refresh.tables.latest()
    assert number == 2 and moved["changed"] > 0
    np.testing.assert_array_equal(table, brute_force(current["embeddings"], labels, np.full(60, -1), 4))
    assert moved["method"] == "exact" and moved["seconds"] >= moved["mine_seconds"] >= 0


# --------------------------------------------------------------------------- head mode: record and resume

REFRESH = dict(hard_negative_share=0.5, hard_negatives_per_item=5,
               hard_negatives=HardNegativesConfig(source="current", refresh_every=1, random_share=0.2))


def _capture_tables(monkeypatch):
    mined = []
    real = mining.mine_hard_negatives

    def capture(*args, **kwargs):
        table, info = real(*args, **kwargs)
        mined.append(table.copy())
        return table, info

    import pipeline.training.refresh as refresh_module

    monkeypatch.setattr(refresh_module, "mine_hard_negatives", capture)
    return mined


def test_head_mode_refreshes_records_and_resumes_with_the_same_tables(tmp_path, monkeypatch):
    from tests.training.test_train import clustered_features

    data = clustered_features()
    runs = tmp_path / "straight"
    write_phase1(runs, *data)
    mined = _capture_tables(monkeypatch)
    (out,) = run_train(make_config(runs, epochs=4, steps_per_epoch=3, **REFRESH))
    summary = json.loads((out / "training.json").read_text())["hard_negatives"]
    assert summary["source"] == "current" and summary["n_refreshes"] == 3 == len(mined)
    assert [r["epoch"] for r in summary["refreshes"]] == [1, 2, 3]
    assert all(r["changed"] > 0 for r in summary["refreshes"]), "the head moves, so the table moves"
    straight_tables, straight_history = list(mined), pd.read_csv(out / "history.csv")
    mined.clear()

    runs = tmp_path / "resumed"
    write_phase1(runs, *data)
    config = make_config(runs, epochs=4, steps_per_epoch=3, **REFRESH)
    with pytest.raises(KeyboardInterrupt):
        run_train(config, extra_callbacks=[_Interrupt(after_epoch=2)])
    backup = runs / "t" / "train" / TAG / "triplet" / "backup"
    state = json.loads((backup / "state.json").read_text())
    committed = state["extras"]["hard_negatives"]
    assert committed["table"] == 2 and (backup / committed["file"]).is_file()
    np.testing.assert_array_equal(np.load(backup / committed["file"]), straight_tables[1])
    run_train(config)
    # The resumed run mined only the last table, the same as the uninterrupted run's, and trained the same.
    assert len(mined) == 3 and all((a == b).all() for a, b in zip(mined, straight_tables))
    resumed = json.loads((runs / "t" / "train" / TAG / "triplet" / "training.json").read_text())
    assert [r["changed"] for r in resumed["hard_negatives"]["refreshes"]] == \
        [r["changed"] for r in summary["refreshes"]]
    history = pd.read_csv(runs / "t" / "train" / TAG / "triplet" / "history.csv")
    np.testing.assert_allclose(history[["loss", "val_MAP@R"]], straight_history[["loss", "val_MAP@R"]], rtol=1e-4)


def test_a_crash_between_the_refresh_and_its_commit_remines_the_same_table(tmp_path, monkeypatch):
    from pipeline.training import checkpoints
    from tests.training.test_train import clustered_features

    runs = tmp_path / "runs"
    write_phase1(runs, *clustered_features())
    config = make_config(runs, epochs=3, steps_per_epoch=3, **REFRESH)
    mined = _capture_tables(monkeypatch)
    real_write = checkpoints.atomic.write_json

    def dies_at_the_second_commit(path, obj, *args, **kwargs):
        if Path(path).name == checkpoints.STATE_FILE and obj.get("epoch") == 2 and not obj.get("finished"):
            raise KeyboardInterrupt   # epoch 2 refreshed its table, but the commit never happened
        return real_write(path, obj, *args, **kwargs)

    monkeypatch.setattr(checkpoints.atomic, "write_json", dies_at_the_second_commit)
    with pytest.raises(KeyboardInterrupt):
        run_train(config)
    assert len(mined) == 2
    monkeypatch.setattr(checkpoints.atomic, "write_json", real_write)
    run_train(config)
    # Resumed after epoch 1 (table 1 in force), epoch 2 is redone and mines table 2 again: the same one.
    assert len(mined) == 3
    np.testing.assert_array_equal(mined[2], mined[1])


# --------------------------------------------------------------------------- finetune mode

def test_finetune_mode_refreshes_from_the_network_being_trained(tmp_path):
    import run as cli
    from tests.conftest import make_class_folder

    images = make_class_folder(tmp_path / "images", n_classes=5, per_class=8, size=32)
    args = ["--run", "r", "--set", f"runs_dir={tmp_path}/runs", "--set", f"reports_dir={tmp_path}/reports",
            "--set", f"data.tfrecords_dir={tmp_path}/tfrecords", "--set", "data.name=tiny",
            "--set", "extract.backbones.0.alpha=0.25", "--set", "extract.backbones.0.image_size=32",
            "--set", "extract.backbones.0.weights=none", "--set", "train.finetune_layers=3",
            "--set", "train.embedding_dim=8", "--set", "train.n_classes_per_batch=3",
            "--set", "train.n_samples_per_class=2", "--set", "train.steps_per_epoch=2", "--set", "train.export=false",
            "--set", "train.hard_negatives_per_item=3", "--set", "train.hard_negative_share=0.5",
            "--set", "train.hard_negatives.source=current"]
    assert cli.main(["phase0", "--source", str(images), "--ratios", "0.8,0.2,0", *args]) == 0
    assert cli.main(["phase1", *args]) == 0
    assert cli.main(["phase3", "--mode", "finetune", "--loss", "triplet", "--epochs", "2", *args]) == 0
    (path,) = (tmp_path / "runs" / "r" / "train").glob("*/triplet/training.json")
    summary = json.loads(path.read_text())
    refreshes = summary["hard_negatives"]["refreshes"]
    assert summary["mode"] == "finetune" and [r["epoch"] for r in refreshes] == [1]
    assert refreshes[0]["embed_seconds"] > 0 and refreshes[0]["changed"] >= 0
