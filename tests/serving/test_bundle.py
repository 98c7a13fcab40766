"""Bundle versions: written whole, published by one rename of CURRENT, add/remove without re-embedding."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.serving import bundle as bundle_format
from pipeline.core.errors import BundleError
from pipeline.serving.bundle import add_items, current_version, open_bundle, remove_items, verify_bundle


def _png(seed: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_added_image_finds_itself_first_and_removed_items_are_gone(bundle_copy):
    from pipeline.serving.search import Searcher

    before = open_bundle(bundle_copy)
    n = len(before.items)
    rejected = {}
    added = add_items(bundle_copy, [_png(1), b"not an image", _png(2)],
                      [{"id": "new-1", "label_name": "class_0", "text": "a new one"}, {"id": "broken"},
                       {"id": "new-2", "label_name": "brand_new"}], rejected=rejected)
    assert added == ["new-1", "new-2"] and list(rejected) == ["broken"]
    after = open_bundle(bundle_copy)
    assert after.version == "v0002" and len(after.items) == n + 2
    # Nothing else was re-embedded: the old rows are the same vectors.
    np.testing.assert_array_equal(after.embeddings[:n], before.embeddings)
    row = after.items.set_index("id").loc["new-1"]
    assert row["label"] == before.items.loc[before.items["label_name"] == "class_0", "label"].iat[0]
    assert after.items.set_index("id").loc["new-2", "label"] == before.items["label"].max() + 1
    assert after.thumbnail("new-2") == _png(2)   # small images are kept as they are
    assert after.thumbnail(before.items["id"].iat[0]) == before.thumbnail(before.items["id"].iat[0])

    searcher = Searcher(after)
    vectors, errors = searcher.embed_images([_png(2)])
    assert not errors
    top = searcher.search(vectors, k=3)[0]
    assert top[0].id == "new-2" and top[0].score == pytest.approx(1.0, abs=1e-4) and top[0].rank == 1

    version = remove_items(bundle_copy, ["new-2", before.items["id"].iat[0]])
    removed = open_bundle(bundle_copy)
    assert version == removed.version == "v0003" and len(removed.items) == n
    assert "new-2" not in set(removed.items["id"])
    assert all(h.id != "new-2" for h in Searcher(removed).search(vectors, k=n)[0])
    with pytest.raises(BundleError, match="not in bundle .*'nope'"):
        remove_items(bundle_copy, ["nope"])
    with pytest.raises(BundleError, match="already in bundle"):
        add_items(bundle_copy, [_png(3)], [{"id": "new-1"}])
    with pytest.raises(BundleError, match="cannot be read"):
        add_items(bundle_copy, [b"garbage"], [{"id": "x"}])   # without `rejected`: an error, nothing written
    assert current_version(bundle_copy) == "v0003"
    # Only the last two versions are kept; thumbnails of unchanged segments are shared (hard links).
    assert sorted(p.name for p in (bundle_copy / "versions").iterdir()) == ["v0002", "v0003"]
    v3_segments = list((bundle_copy / "versions/v0003/thumbnails").iterdir())
    assert any(p.stat().st_nlink > 1 for p in v3_segments)
    assert verify_bundle(bundle_copy) == "v0003"


def test_a_reader_on_an_old_version_keeps_working_while_new_ones_are_written(bundle_copy):
    from pipeline.serving.search import Searcher

    old = open_bundle(bundle_copy)
    searcher = Searcher(old)
    first = old.items["id"].iat[0]
    query = old.embeddings[:1]
    expected = searcher.search(query, k=5)[0]
    remove_items(bundle_copy, [old.items["id"].iat[1]])
    remove_items(bundle_copy, [old.items["id"].iat[2]])
    remove_items(bundle_copy, [old.items["id"].iat[3]])     # v0001's folder is pruned by now
    assert not (bundle_copy / "versions/v0001").exists()
    assert searcher.search(query, k=5)[0] == expected
    assert old.thumbnail(first)[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xe1")
    assert open_bundle(bundle_copy).version == "v0004"


def test_a_crash_mid_write_never_becomes_current(bundle_copy, monkeypatch):
    live = current_version(bundle_copy)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(bundle_format.atomic, "save_npy", crash)   # after models and thumbnails are written
    with pytest.raises(OSError, match="simulated"):
        remove_items(bundle_copy, [open_bundle(bundle_copy).items["id"].iat[0]])
    monkeypatch.undo()
    assert current_version(bundle_copy) == live
    assert not list((bundle_copy / "versions").glob(".*partial"))
    # A writer killed outright leaves its partial folder: readers never see it, the next writer removes it.
    (bundle_copy / "versions/.v0009.partial").mkdir()
    assert open_bundle(bundle_copy).version == live
    assert remove_items(bundle_copy, [open_bundle(bundle_copy).items["id"].iat[0]]) == "v0002"
    assert not (bundle_copy / "versions/.v0009.partial").exists()


def test_a_corrupt_or_missing_bundle_is_one_clear_error(bundle_copy, tmp_path):
    with pytest.raises(BundleError, match="no bundle at"):
        open_bundle(tmp_path / "nothing")
    folder = bundle_copy / "versions" / current_version(bundle_copy)
    embeddings = folder / "embeddings.npy"
    data = bytearray(embeddings.read_bytes())
    data[-1] ^= 0xFF
    embeddings.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="embeddings.npy does not match its sha256"):
        open_bundle(bundle_copy)
    (folder / "bundle.json").write_text("{")
    with pytest.raises(BundleError, match="not valid JSON"):
        open_bundle(bundle_copy)
    card = json.loads('{"format": 1, "files": {"index.faiss": {"bytes": 1, "sha256": "0"}}}')
    (folder / "bundle.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="index.faiss has"):
        open_bundle(bundle_copy)
