"""CLIP in finetune mode: which units train, that only they change, and mixed precision (tiny random CLIP)."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline.config import BackboneConfig, TrainConfig

TINY = dict(vision_image_size=32, vision_patch_size=8, vision_hidden_dim=32, vision_num_layers=2, vision_num_heads=2,
            vision_intermediate_dim=64, projection_dim=16, text_hidden_dim=32, text_num_layers=1, text_num_heads=2,
            text_intermediate_dim=64, text_vocabulary_size=600)
CLIP = BackboneConfig(name="clip-vit-b32", weights="none", image_size=32, params=TINY)
UNITS = ["embedding", "pre_layer_norm", "encoder_block_0", "encoder_block_1", "layer_norm", "vision_projection"]


def _model(finetune_layers: int, embedding_dim: int = 0):
    from pipeline.training.finetune import build_finetune_model

    return build_finetune_model(CLIP, embedding_dim, finetune_layers)


def _batch():
    images = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    return images, np.repeat(np.arange(4), 2).astype("int32")


def _train_one_step(model, trunk, finetune_layers: int, embedding_dim: int):
    from pipeline.training.finetune import finetune_optimizer
    from pipeline.training.objectives import objective_for

    settings = TrainConfig(mode="finetune", embedding_dim=embedding_dim, finetune_layers=finetune_layers,
                           learning_rate=1e-2, finetune_learning_rate=1e-2)
    compiled = objective_for("supcon", {"temperature": 0.07}).compile(model, finetune_optimizer(trunk, settings),
                                                                     jit_compile=False)
    loss = compiled.train_on_batch(*_batch())
    return float(np.ravel(loss)[0]), compiled


def test_clip_units_run_input_to_output_and_hold_every_trunk_variable():
    from pipeline.training.finetune import trunk_units

    _, trunk, _ = _model(0)
    units = trunk_units(CLIP, trunk)
    assert [unit.name for unit in units] == UNITS
    in_units = sorted(v.path for unit in units for v in unit.weights)
    assert in_units == sorted(v.path for v in trunk.weights) and len(set(in_units)) == len(in_units)


@pytest.mark.parametrize("finetune_layers, trained", [
    (0, []), (1, ["vision_projection"]), (3, ["encoder_block_1", "layer_norm", "vision_projection"]),
    (100, UNITS)])
def test_clip_finetune_layers_counts_units_from_the_output(finetune_layers, trained):
    from pipeline.training.finetune import trunk_units

    model, trunk, _ = _model(finetune_layers)
    trainable = {id(v) for v in trunk.trainable_weights}
    for unit in trunk_units(CLIP, trunk):
        if unit.name in trained:
            assert unit.trainable_weights and {id(v) for v in unit.trainable_weights} <= trainable, unit.name
        else:
            assert not {id(v) for v in unit.weights} & trainable, unit.name
    assert model.output.shape[-1] == 16   # no head: CLIP's own projection is the embedding


def test_keras_application_units_are_its_layers_as_before():
    from pipeline.training.finetune import build_finetune_model, trunk_units

    backbone = BackboneConfig(name="mobilenet", weights="none", image_size=32, alpha=0.25)
    _, trunk, _ = build_finetune_model(backbone, 8, 5)
    assert trunk_units(backbone, trunk) == list(trunk.layers)
    trainable = [layer.name for layer in trunk.layers if layer.trainable]
    # The last five layers, less BatchNormalization (frozen, statistics included).
    assert trainable == [layer.name for layer in trunk.layers[-5:]
                         if not isinstance(layer, keras.layers.BatchNormalization)]


@pytest.mark.parametrize("embedding_dim", [0, 8])
def test_a_training_step_changes_the_chosen_blocks_and_nothing_frozen(embedding_dim):
    model, trunk, _ = _model(3, embedding_dim)
    from pipeline.training.finetune import trunk_units

    before = {id(v): v.numpy().copy() for v in model.weights}
    assert np.isfinite(_train_one_step(model, trunk, 3, embedding_dim)[0])
    changed = {id(v) for v in model.weights if not np.array_equal(before[id(v)], v.numpy())}
    units = {unit.name: {id(v) for v in unit.weights} for unit in trunk_units(CLIP, trunk)}
    assert units["encoder_block_1"] | units["layer_norm"] | units["vision_projection"] <= changed
    for frozen in ("embedding", "pre_layer_norm", "encoder_block_0"):
        assert not units[frozen] & changed, frozen
    head = {id(v) for v in model.weights} - {id(v) for v in trunk.weights}
    assert bool(head) == bool(embedding_dim) and head <= changed | {id(v) for v in model.non_trainable_weights}


def test_a_mixed_precision_step_is_finite_and_embeddings_stay_float32():
    from pipeline.training.loop import dtype_policy

    with dtype_policy("mixed_float16"):
        model, trunk, _ = _model(100)
        assert trunk.get_layer("vision_projection").compute_dtype == "float16"
        before = trunk.get_layer("vision_projection").kernel.numpy().copy()
        losses = [_train_one_step(model, trunk, 100, 0) for _ in range(2)]
        embeddings = model(_batch()[0])
    assert all(np.isfinite(loss) for loss, _ in losses) and embeddings.dtype == "float32"
    np.testing.assert_allclose(np.linalg.norm(np.asarray(embeddings), axis=1), 1.0, atol=1e-5)
    optimizer = losses[-1][1].optimizer
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    # Dynamic loss scaling skips a step whose float16 gradients overflowed and halves the scale;
    # a step that was applied changed the weights. Either way the state stays finite.
    updated = not np.array_equal(before, trunk.get_layer("vision_projection").kernel.numpy())
    assert updated or float(optimizer.dynamic_scale) < 2.0 ** 15
    assert all(np.isfinite(v.numpy()).all() for v in trunk.trainable_weights)
