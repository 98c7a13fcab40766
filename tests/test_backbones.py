import numpy as np
import pytest

import keras

from models.backbones import (BACKBONES, WeightsUnavailableError, build_feature_extractor, get_spec,
                              resolve_imagenet_weights)
from models.layers import ImagePreprocess, L2Normalize
from tests.conftest import shared_path


def test_registry_has_the_named_backbones_at_native_sizes():
    assert get_spec("resnet50").native_size == 224
    assert get_spec("efficientnetb7").native_size == 600
    assert [get_spec(f"efficientnetb{i}").native_size for i in range(8)] == [224, 240, 260, 300, 380, 456, 528, 600]
    assert "mobilenet" in BACKBONES
    with pytest.raises(ValueError, match="unknown backbone"):
        get_spec("vgg99")


@pytest.mark.parametrize("mode,reference", [
    ("tf", keras.applications.mobilenet.preprocess_input),
    ("caffe", keras.applications.resnet.preprocess_input),
])
def test_preprocess_layer_matches_keras_applications(mode, reference):
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    ours = np.asarray(ImagePreprocess(mode)(x))
    np.testing.assert_allclose(ours, reference(x.copy()), rtol=1e-5, atol=1e-4)


def test_l2_normalize_unit_rows_and_zero_rows_stay_finite():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype="float32")
    y = np.asarray(L2Normalize()(x))
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0]], atol=1e-6)


def test_feature_extractor_outputs_raw_and_unit_features():
    fe = build_feature_extractor("mobilenet", weights="none", image_size=32, alpha=0.25)
    assert fe.weights_loaded == "random" and fe.dim == 256
    out = fe.model.predict(np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32"), verbose=0)
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out["embedding"], out["pooled"] / np.linalg.norm(out["pooled"], axis=1, keepdims=True),
                               atol=1e-5)


def _no_cache(monkeypatch, tmp_path):
    import models.backbones.registry as bb
    monkeypatch.setattr(bb, "keras_cache_dirs", lambda: [tmp_path / "models"])

    def offline(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(bb.keras.utils, "get_file", offline)


def test_missing_imagenet_weights_fail_naming_the_file(monkeypatch, tmp_path):
    _no_cache(monkeypatch, tmp_path)
    with pytest.raises(WeightsUnavailableError) as err:
        build_feature_extractor("resnet50", weights="imagenet", image_size=32)
    message = str(err.value)
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert str(tmp_path / "models") in message and "--weights none" in message


def test_random_fallback_is_explicit_and_reported(monkeypatch, tmp_path, caplog):
    _no_cache(monkeypatch, tmp_path)
    fe = build_feature_extractor("mobilenet", weights="imagenet", image_size=32, alpha=0.25, weights_fallback="random")
    assert fe.weights_loaded.startswith("random")
    assert any("RANDOM" in r.getMessage() for r in caplog.records)


def test_weights_path_must_exist(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="not found"):
        build_feature_extractor("mobilenet", weights=str(tmp_path / "nope.h5"), image_size=32, alpha=0.25)


def test_real_mobilenet_weights_from_shared_keras_cache(monkeypatch):
    home = shared_path("keras")
    import models.backbones.registry as bb
    monkeypatch.setattr(bb, "keras_cache_dirs", lambda: [home / "models"])
    path = resolve_imagenet_weights(get_spec("mobilenet"), 0.25)
    assert path.name == "mobilenet_2_5_224_tf_no_top.h5"
    fe = build_feature_extractor("mobilenet", weights="imagenet", image_size=128, alpha=0.25)
    assert fe.weights_loaded == "imagenet"
    reference = keras.applications.MobileNet(alpha=0.25, include_top=False, weights=None, input_shape=(128, 128, 3),
                                             pooling="avg")
    reference.load_weights(str(path))
    x = np.random.default_rng(1).uniform(0, 255, (2, 128, 128, 3)).astype("float32")
    ours = fe.model.predict(x, verbose=0)["pooled"]
    theirs = reference.predict(keras.applications.mobilenet.preprocess_input(x.copy()), verbose=0)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
