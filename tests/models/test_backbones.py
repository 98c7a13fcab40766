from pathlib import Path

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


def _no_cache(monkeypatch, tmp_path, reason="network unreachable"):
    import models.backbones.weights as bw
    monkeypatch.setattr(bw, "keras_cache_dirs", lambda: [tmp_path / "models"])

    def offline(*args, **kwargs):
        raise OSError(reason)
    monkeypatch.setattr(keras.utils, "get_file", offline)


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
    import models.backbones.weights as bw
    monkeypatch.setattr(bw, "keras_cache_dirs", lambda: [home / "models"])
    path = resolve_imagenet_weights(get_spec("mobilenet").trunk.weights_file({"alpha": 0.25}), "mobilenet")
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


# --------------------------------------------------------------------------- specs describe themselves


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_describes_its_tag_options_and_sizes(name):
    spec = get_spec(name)
    defaults = spec.resolve_params({})
    assert set(defaults) == set(spec.params)
    assert spec.tag({}, 0, "imagenet").startswith(name + "-") and spec.tag({}, 0, "imagenet").endswith("-imagenet")
    assert spec.tag({}, 64, "/some/file.h5").endswith("-64-custom")
    spec.check({}, 0, "imagenet", "error")
    spec.check({}, spec.min_size, "none", "error")
    for size in (spec.min_size - 1, -5):
        with pytest.raises(ValueError, match=f"at least {spec.min_size} px"):
            spec.check({}, size, "none", "error")
    with pytest.raises(ValueError, match="no parameter"):
        spec.resolve_params({"no_such_option": 1})


def test_tags_of_existing_run_folders_are_unchanged():
    """Folders written before backbones had params must still be found under the same names."""
    assert get_spec("mobilenet").tag({"alpha": 0.25}, 96, "imagenet") == "mobilenet-a0.25-96-imagenet"
    assert get_spec("mobilenet").tag({}, 0, "none") == "mobilenet-a1-none"
    assert get_spec("resnet50").tag({}, 224, "imagenet") == "resnet50-224-imagenet"
    # Older configs carried alpha for every backbone: accepted, ignored, kept in fingerprints.
    assert get_spec("resnet50").resolve_params({"alpha": 1.0}) == {}
    assert get_spec("resnet50").fingerprint_params({}) == {"alpha": 1.0}
    assert get_spec("mobilenet").fingerprint_params({"alpha": "0.25"}) == {"alpha": 0.25}


def test_option_values_are_checked_against_their_type_and_the_published_weights():
    spec = get_spec("mobilenet")
    assert spec.resolve_params({"alpha": "0.5"}) == {"alpha": 0.5}
    with pytest.raises(ValueError, match="expects a float"):
        spec.resolve_params({"alpha": "wide"})
    with pytest.raises(ValueError, match="only for alpha"):
        spec.check({"alpha": 0.3}, 0, "imagenet", "error")
    spec.check({"alpha": 0.3}, 0, "none", "error")
    spec.check({"alpha": 0.3}, 0, "imagenet", "random")  # the fallback says so at run time


def test_importing_the_registry_loads_no_tensorflow():
    import subprocess
    import sys

    code = "import sys, models.backbones; assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_random_initialisation_is_seeded():
    """Two builds with weights=none and one seed are one network (a resumed extraction stays consistent)."""
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    first, second, other = (build_feature_extractor("mobilenet", weights="none", image_size=32, alpha=0.25,
                                                    init_seed=seed) for seed in (7, 7, 8))
    assert first.init_seed == 7 and first.weights_loaded == "random"
    same = [fe.model.predict(x, verbose=0)["embedding"] for fe in (first, second)]
    np.testing.assert_array_equal(same[0], same[1])
    assert any(not np.array_equal(a, b) for a, b in zip(first.model.get_weights(), other.model.get_weights()))


def test_a_garbage_weights_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_text("x\n")
    with pytest.raises(WeightsUnavailableError) as err:
        build_feature_extractor("mobilenet", weights=str(bad), image_size=32, alpha=0.25)
    message = str(err.value)
    assert "\n" not in message and str(bad) in message and "cannot be loaded into backbone 'mobilenet'" in message


def test_failed_download_message_is_whole_words_and_says_where_the_file_goes(monkeypatch, tmp_path):
    reason = ("<urlopen error [Errno -2] Name or service not known> while fetching "
              + "a very long explanation " * 20)
    _no_cache(monkeypatch, tmp_path, reason)
    with pytest.raises(WeightsUnavailableError) as err:
        build_feature_extractor("mobilenet", weights="imagenet", image_size=32, alpha=0.25)
    message = str(err.value)
    assert "Name or service not known" in message, "the reason is not cut mid-word"
    assert "mobilenet_2_5_224_tf_no_top.h5" in message
    assert f"Put the file at {tmp_path / 'models' / 'mobilenet_2_5_224_tf_no_top.h5'}" in message
    assert "a very long explanation a …)" in message, "a long reason is shortened between words, and says so"
    assert "--weights none" in message
