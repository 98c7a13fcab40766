"""The exported SavedModels: reloaded by plain TensorFlow they give the in-project embeddings."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.serving.conftest import TAG


def test_export_round_trip_reproduces_the_stored_embeddings(tiny_run, exported):
    """serving_default on TFRecord bytes = phase 1's embeddings (max abs diff asserted and stored in the card)."""
    import tensorflow as tf

    from pipeline.data.record_reader import list_shards
    from pipeline.serving.bundle import open_bundle

    tmp_path, _ = tiny_run
    bundle = open_bundle(exported)
    card = bundle.card
    assert card["source"]["tag"] == TAG and card["loss"] == "pretrained"
    assert card["export_check"]["max_abs_diff"] <= 1e-4 and card["export_check"]["images"] >= 3
    assert card["index"]["type"] == "flat" and card["index"]["recall@10"] == 1.0
    assert card["image_size"] == 32 and card["embedding_dim"] == bundle.embeddings.shape[1]
    assert set(card["files"]) >= {"items.parquet", "embeddings.npy", "index.faiss", "image_model/saved_model.pb"}
    assert card["metrics"]["MAP@R"] is not None and card["models"]["text"] is None

    # Independently of embedlab's serving code: plain TensorFlow, the raw TFRecord bytes of every test image.
    records = tf.data.TFRecordDataset([str(p) for p in list_shards(tmp_path / "tfrecords/tiny", "test")])
    parsed = [tf.io.parse_single_example(r, {"id": tf.io.FixedLenFeature([], tf.string),
                                             "image": tf.io.FixedLenFeature([], tf.string)}) for r in records]
    loaded = tf.saved_model.load(str(bundle.image_model_dir))
    served = loaded.signatures["serving_default"](images=tf.stack([p["image"] for p in parsed]))["embedding"].numpy()
    emb_dir = tmp_path / f"runs/s/embeddings/{TAG}"
    items = pd.read_csv(emb_dir / "items.csv", keep_default_na=False, dtype={"id": str})
    row = {item_id: r for r, item_id in enumerate(items["id"])}
    expected = np.load(emb_dir / "embeddings.npy")[[row[p["id"].numpy().decode()] for p in parsed]]
    max_diff = float(np.max(np.abs(served - expected)))
    assert max_diff <= 1e-4, max_diff
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    # The pixels endpoint agrees with the bytes endpoint on the same decode.
    from pipeline.data.tfrecords import decode_and_resize

    pixels = tf.stack([decode_and_resize(p["image"], 32) for p in parsed])
    np.testing.assert_allclose(loaded.embed_pixels(pixels)["embedding"].numpy(), served, atol=1e-6)
    bundle.close()


def test_export_is_up_to_date_the_second_time(tiny_run, exported):
    import run as cli

    _, args = tiny_run
    before = (exported / "CURRENT").read_text()
    assert cli.main(["export", *args]) == 0
    assert (exported / "CURRENT").read_text() == before
    assert json.loads((exported / "versions" / before.strip() / "bundle.json").read_text())["history"][0]["action"] \
        == "export"


FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hf_clip_tiny"


def test_clip_text_model_tokenises_in_the_graph_like_the_python_tokenizer(tmp_path, monkeypatch):
    """A real (tiny, converted Hugging Face) CLIP: the text SavedModel's in-graph ids equal the Python
    tokenizer's on varied texts, its embeddings the text tower's; a bundle with it answers text queries."""
    monkeypatch.setenv("EMBEDLAB_CACHE", str(tmp_path / "cache"))
    from models.backbones import build_feature_extractor
    from pipeline.phases.export import CHECK_TEXTS
    from pipeline.serving.bundle import open_bundle, write_bundle
    from pipeline.serving.search import Searcher
    from pipeline.serving.serving_model import (
        embedding_output, text_model_error, write_image_saved_model, write_text_saved_model,
    )

    extractor = build_feature_extractor("clip", weights="imagenet", image_size=32, params={"preset": str(FIXTURE)},
                                        with_text=True)
    assert extractor.text is not None and extractor.text.tokenizer_source != "byte-level"
    write_text_saved_model(extractor.text, tmp_path / "text_model")
    texts = ["red floral dress", "blue denim jeans", "black leather shoes"]
    vectors = extractor.text.embed(texts).embedding
    image_model = embedding_output(extractor.model)
    write_image_saved_model(image_model, tmp_path / "image_model")
    pngs = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue", "black")]
    encoded = []
    for png in pngs:
        out = io.BytesIO()
        png.save(out, format="PNG")
        encoded.append(out.getvalue())
    items = pd.DataFrame({"id": ["a", "b", "c"], "label": [0, 1, 2], "label_name": ["dress", "jeans", "shoes"],
                          "path": "", "text": texts, "group": "", "split": "test"})
    # Text vectors as the collection: a text query then finds its own text first.
    write_bundle(tmp_path / "b", items, vectors, encoded, tmp_path / "image_model", {"backbone": {"name": "clip"}},
                 text_model=tmp_path / "text_model")
    searcher = Searcher(open_bundle(tmp_path / "b"))
    assert searcher.has_text
    varied = [*CHECK_TEXTS, "Vestido ROJO de flores, talla 38", "x" * 1000, "tab\tand\nnewline", "İstanbul ß"]
    check = text_model_error(searcher.text_model, extractor.text, varied)   # export's check, on the reloaded model
    assert check["ids_equal"] and check["max_abs_diff"] <= 1e-4, check
    for text, hits in zip(texts, searcher.search(searcher.embed_texts(texts), k=3)):
        assert hits[0].text == text and hits[0].score == pytest.approx(1.0, abs=1e-4)
