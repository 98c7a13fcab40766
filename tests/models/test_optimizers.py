"""ScaledAdamW: per-variable learning rates checked against two independent AdamW optimizers."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.optimizers import ScaledAdamW

STEPS, BATCH = 4, 8


def _model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, name="trunk_dense")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="head_dense")(hidden))


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(STEPS * BATCH, 6)).astype("float32"), rng.normal(size=(STEPS * BATCH, 3)).astype("float32")


def _reference_weights(trunk_lr: float, head_lr: float, weight_decay: float, epochs: int):
    """The same model trained with one plain AdamW per layer, on the same batches."""
    x, y = _data()
    model = _model()
    trunk = model.get_layer("trunk_dense").trainable_variables
    head = model.get_layer("head_dense").trainable_variables
    trunk_opt = keras.optimizers.AdamW(learning_rate=trunk_lr, weight_decay=weight_decay)
    head_opt = keras.optimizers.AdamW(learning_rate=head_lr, weight_decay=weight_decay)
    for _ in range(epochs):
        for step in range(STEPS):
            rows = slice(step * BATCH, (step + 1) * BATCH)
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(keras.losses.mean_squared_error(y[rows], model(x[rows])))
            grads = tape.gradient(loss, trunk + head)
            trunk_opt.apply_gradients(zip(grads[:len(trunk)], trunk))
            head_opt.apply_gradients(zip(grads[len(trunk):], head))
    return model.get_weights()


@pytest.mark.parametrize("jit_compile", [False, True])
def test_scaled_variables_train_as_under_their_own_adamw(jit_compile):
    x, y = _data()
    model = _model()
    paths = {v.path: 0.1 for v in model.get_layer("trunk_dense").trainable_variables}
    model.compile(ScaledAdamW(lr_multipliers=paths, learning_rate=1e-2, weight_decay=0.5), loss="mse",
                  jit_compile=jit_compile)
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    for got, expected in zip(model.get_weights(), _reference_weights(1e-3, 1e-2, 0.5, epochs=2)):
        np.testing.assert_allclose(got, expected, atol=2e-6)


def test_without_multipliers_it_is_adamw():
    x, y = _data()
    model = _model()
    model.compile(ScaledAdamW(learning_rate=1e-2, weight_decay=0.5), loss="mse")
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    for got, expected in zip(model.get_weights(), _reference_weights(1e-2, 1e-2, 0.5, epochs=1)):
        np.testing.assert_allclose(got, expected, atol=2e-6)


def test_a_zero_multiplier_freezes_and_the_longest_prefix_wins():
    opt = ScaledAdamW(lr_multipliers={"trunk": 0.5, "trunk_dense/": 0.0})
    assert opt.multiplier_for("trunk_dense/kernel") == 0.0
    assert opt.multiplier_for("trunk_other/kernel") == 0.5
    assert opt.multiplier_for("head_dense/kernel") == 1.0
    with pytest.raises(ValueError):
        ScaledAdamW(lr_multipliers={"x": -1.0})


def test_saves_and_reloads_with_the_model(tmp_path):
    x, y = _data()
    model = _model()
    model.compile(ScaledAdamW(lr_multipliers={"trunk_dense/kernel": 0.25}, learning_rate=1e-3), loss="mse")
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(reloaded.optimizer, ScaledAdamW)
    assert reloaded.optimizer.lr_multipliers == {"trunk_dense/kernel": 0.25}
