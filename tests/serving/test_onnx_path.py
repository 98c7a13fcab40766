"""The optional ONNX Runtime image path: image_model.onnx written only when it matches the SavedModel, carried
into later versions, used by the Searcher when onnxruntime imports (same vectors to 1e-4), else the SavedModel."""
from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")

from tests.serving.tiny_bundle import CLASSES, class_image, tiny_image_model  # noqa: E402


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory):
    """(bundle root, the Keras model, {id: encoded image}, the ONNX check record), written as export writes it."""
    import pandas as pd

    from pipeline.serving.bundle import write_bundle
    from pipeline.serving.serving_model import ImageEmbedder, write_image_onnx, write_image_saved_model
    from pipeline.serving.thumbnails import thumbnails_of

    work = tmp_path_factory.mktemp("onnx-bundle")
    model = tiny_image_model()
    write_image_saved_model(model, work / "image_model")
    images = {f"{name}-{i}": class_image(c, i) for c, name in enumerate(CLASSES) for i in range(3)}
    rows = [{"id": i, "label": 0, "label_name": i.split("-")[0], "path": f"{i}.png", "text": "", "group": "",
             "split": "test"} for i in images]
    vectors, errors, _ = ImageEmbedder(work / "image_model").embed(list(images.values()))
    assert not errors
    check = write_image_onnx(model, work / "image_model.onnx", work / "image_model", list(images.values())[:4])
    root = work / "bundle"
    write_bundle(root, pd.DataFrame(rows), vectors, thumbnails_of(list(images.values()), workers=1),
                 work / "image_model", {"export_check": {"onnx": check}}, index_kind="flat",
                 image_onnx=work / "image_model.onnx" if check["written"] else None)
    return root, model, images, check


def test_export_writes_a_checked_onnx_file_listed_on_the_card(onnx_bundle):
    import onnxruntime
    import tensorflow as tf

    from pipeline.serving.bundle import IMAGE_ONNX, open_bundle, sha256_of
    from pipeline.serving.serving_model import decode_batch

    root, model, images, check = onnx_bundle
    assert check["written"] and check["reason"] is None and check["images"] == 4
    assert 0 <= check["max_abs_diff"] <= 1e-4
    bundle = open_bundle(root)
    assert bundle.image_onnx == bundle.folder / IMAGE_ONNX
    assert bundle.card["export_check"]["onnx"]["max_abs_diff"] == check["max_abs_diff"]
    assert bundle.card["files"][IMAGE_ONNX]["sha256"] == sha256_of(bundle.image_onnx)
    # Independently of the SavedModel: the file under a plain session against the Keras model itself.
    pixels = decode_batch(tf.constant(list(images.values())), 32).numpy()
    session = onnxruntime.InferenceSession(str(bundle.image_onnx), providers=["CPUExecutionProvider"])
    got = session.run(None, {"pixels": pixels})[0]
    np.testing.assert_allclose(got, model.predict(pixels, verbose=0), atol=1e-5)
    bundle.close()


def test_searcher_embeds_with_onnxruntime_as_the_savedmodel_does(onnx_bundle):
    from pipeline.serving.bundle import open_bundle
    from pipeline.serving.search import Searcher
    from pipeline.serving.serving_model import ImageEmbedder

    root, _, images, _ = onnx_bundle
    bundle = open_bundle(root)
    searcher = Searcher(bundle)
    assert searcher.image_backend == "onnxruntime"
    queries = [*images.values(), b"not an image", class_image(1, 40, size=57)]   # 57 px: a resize on the way
    vectors, errors = searcher.embed_images(queries)
    reference, reference_errors, _ = ImageEmbedder(bundle.image_model_dir).embed(queries)
    assert set(errors) == set(reference_errors) == {len(images)}
    keep = [p for p in range(len(queries)) if p not in errors]
    assert np.max(np.abs(vectors - reference[keep])) <= 1e-4
    assert np.max(np.abs(vectors[:len(images)] - bundle.embeddings)) <= 1e-4
    one, _ = searcher.embed_images([queries[0]])
    assert np.max(np.abs(one[0] - bundle.embeddings[0])) <= 1e-4
    assert searcher.search(one, k=1)[0][0].id == next(iter(images))
    bundle.close()


def test_without_onnxruntime_the_searcher_serves_the_savedmodel_and_says_so(onnx_bundle, monkeypatch):
    from pipeline.serving.api_schema import image_backend
    from pipeline.serving.bundle import open_bundle
    from pipeline.serving.search import Searcher

    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # `import onnxruntime` now raises ImportError
    root, _, images, _ = onnx_bundle
    bundle = open_bundle(root)
    searcher = Searcher(bundle)
    assert searcher.image_backend == "savedmodel" and image_backend(searcher) == "savedmodel"
    vectors, errors = searcher.embed_images(list(images.values()))
    assert not errors and np.max(np.abs(vectors - bundle.embeddings)) <= 1e-4
    bundle.close()


def test_later_versions_keep_the_onnx_file_hard_linked(onnx_bundle, tmp_path):
    from pipeline.serving.bundle import open_bundle, remove_items
    from tests.serving.tiny_bundle import copy_bundle

    root = copy_bundle(onnx_bundle[0], tmp_path / "bundle")
    before = open_bundle(root)
    remove_items(root, ["red-0"])
    after = open_bundle(root)
    assert after.version != before.version and after.image_onnx is not None
    assert after.image_onnx.stat().st_ino == before.image_onnx.stat().st_ino
    assert after.card["export_check"]["onnx"]["written"]
    before.close()
    after.close()


def test_an_onnx_file_that_does_not_match_the_savedmodel_is_left_out(onnx_bundle, tmp_path):
    from pipeline.serving.serving_model import write_image_onnx

    root, model, images, _ = onnx_bundle
    other = tiny_image_model()
    other.layers[-2].set_weights([w + 0.5 for w in other.layers[-2].get_weights()])   # the Dense layer, moved
    saved_model = next((root / "versions").glob("v*")) / "image_model"
    record = write_image_onnx(other, tmp_path / "image_model.onnx", saved_model, list(images.values())[:2])
    assert not record["written"] and record["max_abs_diff"] > 1e-4 and "differs from the SavedModel" in record["reason"]
    assert not (tmp_path / "image_model.onnx").exists() and not list(tmp_path.iterdir())


def test_without_tf2onnx_no_onnx_file_is_written(onnx_bundle, tmp_path, monkeypatch):
    from pipeline.serving.serving_model import write_image_onnx

    monkeypatch.setitem(sys.modules, "tf2onnx", None)
    root, model, images, _ = onnx_bundle
    saved_model = next((root / "versions").glob("v*")) / "image_model"
    record = write_image_onnx(model, tmp_path / "image_model.onnx", saved_model, list(images.values())[:2])
    assert not record["written"] and "onnx" in record["reason"] and record["max_abs_diff"] is None
    assert not (tmp_path / "image_model.onnx").exists()


def test_the_export_writes_a_checked_onnx_file(exported):
    from pipeline.serving.bundle import IMAGE_ONNX, open_bundle
    from pipeline.serving.search import Searcher

    bundle = open_bundle(exported)
    onnx_check = bundle.card["export_check"]["onnx"]
    assert onnx_check["written"] and onnx_check["max_abs_diff"] <= 1e-4 and onnx_check["images"] > 0
    assert IMAGE_ONNX in bundle.card["files"] and bundle.card["models"]["image_onnx"]["file"] == IMAGE_ONNX
    assert Searcher(bundle).image_backend == "onnxruntime"
    bundle.close()
