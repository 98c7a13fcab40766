"""Image-text fusion: each mode against numpy, the fallback of text-less rows, the fused head and its round trip."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from models.heads import FUSIONS, TEXT_UNITS, ImageTextFusion, build_fused_head, build_transformer_head


def unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype("float32")


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference(mode, image, text, kernel=None, bias=None):
    """What the fusion layer must compute, row by row, in float64."""
    out = np.empty_like(image, dtype="float64")
    for i, (a, b) in enumerate(zip(image.astype("float64"), text.astype("float64"))):
        if not np.any(b != 0):
            out[i] = a                      # no text: the image embedding itself
        elif mode == "average":
            out[i] = a + b
        elif mode == "concat":
            out[i] = np.concatenate([a, b]) @ kernel + bias
        else:
            g = sigmoid(np.concatenate([a, b]) @ kernel + bias)
            out[i] = g * a + (1 - g) * b
    return out


@pytest.mark.parametrize("mode", FUSIONS)
def test_each_mode_matches_numpy_and_text_less_rows_fall_back(mode):
    rng = np.random.default_rng(0)
    image, text = unit(rng, 6, 8), unit(rng, 6, 8)
    text[[1, 4]] = 0.0
    keras.utils.set_random_seed(0)
    layer = ImageTextFusion(mode)
    got = np.asarray(layer(image, text))
    kernel, bias = (None, None) if mode == "average" else (np.asarray(layer.mix.kernel), np.asarray(layer.mix.bias))
    np.testing.assert_allclose(got, reference(mode, image, text, kernel, bias), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[[1, 4]], image[[1, 4]])
    assert not np.allclose(got[0], image[0])


def test_average_of_unit_vectors_renormalised():
    rng = np.random.default_rng(1)
    image, text = unit(rng, 5, 4), unit(rng, 5, 4)
    text[2] = 0.0
    head = keras.Sequential([keras.Input((4,)), keras.layers.Identity()])
    fused = build_fused_head(head, text_dim=4, fusion="average")
    projection = np.asarray(fused.get_layer("text_projection").kernel)
    projected = text @ projection
    norms = np.linalg.norm(projected, axis=1, keepdims=True)
    text_units = np.divide(projected, norms, out=np.zeros_like(projected), where=norms > 0)
    expected = image + text_units
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    got = np.asarray(fused([image, text]))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[2], image[2], rtol=1e-6)


@pytest.mark.parametrize("mode", ["concat", "gate"])
def test_fused_transformer_head_round_trip(tmp_path, mode):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(2)
    image_head = build_transformer_head((5, 12), 8, num_layers=1, num_heads=2)
    fused = build_fused_head(image_head, text_dim=6, fusion=mode)
    tokens = rng.normal(size=(4, 5, 12)).astype("float32")
    text = unit(rng, 4, 6)
    text[3] = 0.0
    out = np.asarray(fused({"tokens": tokens, "text": text}))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    # The item without text gets the image head's own embedding.
    np.testing.assert_allclose(out[3], np.asarray(image_head(tokens[3:]))[0], rtol=1e-5, atol=1e-6)
    units = np.asarray(keras.Model(fused.inputs, fused.get_layer(TEXT_UNITS).output)([tokens, text]))
    assert np.all(units[3] == 0.0)
    np.testing.assert_allclose(np.linalg.norm(units[:3], axis=1), 1.0, rtol=1e-5)
    fused.save(tmp_path / "fused.keras")
    restored = keras.saving.load_model(tmp_path / "fused.keras", compile=False)
    np.testing.assert_array_equal(np.asarray(restored({"tokens": tokens, "text": text})), out)
    assert restored.get_layer("fusion").mode == mode


def test_bad_fusions_are_refused():
    with pytest.raises(ValueError, match="fusion"):
        ImageTextFusion("sum")
    with pytest.raises(ValueError, match="one width"):
        ImageTextFusion("gate")(np.zeros((2, 4), "float32"), np.zeros((2, 3), "float32"))
