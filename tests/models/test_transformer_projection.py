"""TransformerProjection: shapes, both poolings, padding masks, mixed precision and a save/load round trip."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from models.heads import TransformerProjection, build_transformer_head


def tokens(n=5, t=6, c=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, t, c)).astype("float32")


@pytest.mark.parametrize("pooling", ["cls", "attention"])
@pytest.mark.parametrize("shape", [(6, 16), (16,)], ids=["sequence", "pooled"])
def test_shapes_and_unit_outputs(pooling, shape):
    keras.utils.set_random_seed(0)
    head = build_transformer_head(shape, 12, num_layers=2, num_heads=4, pooling=pooling, width=8)
    x = np.random.default_rng(1).normal(size=(5, *shape)).astype("float32")
    out = np.asarray(head(x))
    assert out.shape == (5, 12) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert head.layers[-1].name == "l2_normalize"
    # Rows are embedded independently of each other (no batch statistics), in inference mode.
    np.testing.assert_allclose(np.asarray(head(x[:2])), out[:2], rtol=1e-5, atol=1e-6)


def test_a_pooled_vector_is_a_sequence_of_one():
    keras.utils.set_random_seed(0)
    layer = TransformerProjection(8, num_layers=1, num_heads=2, dropout=0.0)
    x = tokens(4, 1, 16)
    np.testing.assert_allclose(np.asarray(layer(x[:, 0])), np.asarray(layer(x)), rtol=1e-6, atol=1e-6)


def test_the_blocks_mix_tokens_and_positions_count():
    keras.utils.set_random_seed(0)
    layer = TransformerProjection(8, num_layers=1, num_heads=2, dropout=0.0)
    x = tokens(3, 6, 16)
    shuffled = x[:, ::-1]
    # Learned positions: the order of the tokens matters; without them the head is permutation-invariant.
    assert not np.allclose(np.asarray(layer(x)), np.asarray(layer(shuffled)), atol=1e-4)
    keras.utils.set_random_seed(0)
    unordered = TransformerProjection(8, num_layers=1, num_heads=2, dropout=0.0, positional=False)
    np.testing.assert_allclose(np.asarray(unordered(x)), np.asarray(unordered(shuffled)), rtol=1e-4, atol=1e-5)
    # One token changed changes the class token's output: attention reads every token.
    other = x.copy()
    other[:, 3] += np.random.default_rng(5).normal(size=other[:, 3].shape)   # not a constant: LayerNorm removes it
    assert not np.allclose(np.asarray(unordered(x)), np.asarray(unordered(other)), atol=1e-4)


@pytest.mark.parametrize("pooling", ["cls", "attention"])
def test_padding_is_never_attended_to(pooling):
    keras.utils.set_random_seed(0)
    head = build_transformer_head((6, 16), 8, num_layers=2, num_heads=2, pooling=pooling, padding_mask=True)
    x = tokens(4, 6, 16)
    mask = np.ones((4, 6), bool)
    mask[:, 4:] = False
    mask[1, 2:] = False
    garbage = x.copy()
    garbage[~mask] = np.random.default_rng(9).normal(size=garbage[~mask].shape) * 50
    a = np.asarray(head({"tokens": x, "padding_mask": mask}))
    b = np.asarray(head({"tokens": garbage, "padding_mask": mask}))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Without the mask the padded tokens do count.
    c = np.asarray(head({"tokens": garbage, "padding_mask": np.ones_like(mask)}))
    assert not np.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize("pooling", ["cls", "attention"])
def test_save_and_load_give_identical_outputs(tmp_path, pooling):
    keras.utils.set_random_seed(0)
    head = build_transformer_head((6, 16), 8, num_layers=2, num_heads=4, pooling=pooling, width=12, dropout=0.2)
    x = tokens(5, 6, 16)
    # A step of training so that no weight is at its initial value.
    head.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    head.fit(x, np.ones((5, 8), "float32") / np.sqrt(8), epochs=1, verbose=0)
    head.save(tmp_path / "head.keras")
    restored = keras.saving.load_model(tmp_path / "head.keras", compile=False)
    np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(head(x)))
    layer = restored.get_layer("transformer_projection")
    assert isinstance(layer, TransformerProjection)
    assert (layer.num_layers, layer.num_heads, layer.pooling, layer.width, layer.dropout) == (2, 4, pooling, 12, 0.2)
    assert len(restored.weights) == len(head.weights)


def test_mixed_precision_computes_in_float16_and_outputs_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        head = build_transformer_head((6, 16), 8, num_layers=1, num_heads=2)
        out = head(tokens(3, 6, 16))
        layer = head.get_layer("transformer_projection")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert layer.compute_dtype == "float16" and out.dtype == "float32"
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=1), 1.0, rtol=1e-5)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="pooling"):
        TransformerProjection(8, pooling="mean")
    with pytest.raises(ValueError, match="num_heads"):
        TransformerProjection(8, num_heads=0)
    with pytest.raises(ValueError, match="padding mask"):
        build_transformer_head((16,), 8, padding_mask=True)


@pytest.mark.parametrize("pooling", ["cls", "attention"])
def test_a_residual_head_starts_with_the_frozen_embeddings_cosines(pooling):
    """Before training, residual=True gives the cosines of the mean token (a CNN's pooled embedding) exactly,
    padding left out; after a training step it has moved away from them."""
    keras.utils.set_random_seed(0)
    x = tokens(6, 5, 16) + 0.5            # a shared offset, as post-ReLU feature maps have
    mask = np.ones((6, 5), bool)
    mask[0, 3:] = False
    x[0, 3:] = 1e3                        # padding that must not count in the mean
    head = build_transformer_head((5, 16), 24, num_layers=1, num_heads=2, pooling=pooling, width=8,
                                  residual=True, padding_mask=True)
    out = np.asarray(head({"tokens": x, "padding_mask": mask}), dtype=np.float64)
    pooled = np.stack([x[i][mask[i]].mean(axis=0) for i in range(6)]).astype(np.float64)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    np.testing.assert_allclose(out @ out.T, pooled @ pooled.T, atol=1e-5)

    head.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    head.fit({"tokens": x, "padding_mask": mask}, np.ones((6, 24), "float32") / np.sqrt(24), epochs=2, verbose=0)
    moved = np.asarray(head({"tokens": x, "padding_mask": mask}), dtype=np.float64)
    assert np.abs(moved @ moved.T - pooled @ pooled.T).max() > 1e-3
    layer = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(
        head.get_layer("transformer_projection")))
    assert layer.residual is True
