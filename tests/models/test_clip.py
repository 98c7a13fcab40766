"""CLIP backbones (keras-hub CLIPBackbone): a tiny random CLIP through the pipeline's extractor."""
import numpy as np
import pytest

import keras

from models.backbones import WeightsUnavailableError, build_feature_extractor, get_spec
from models.backbones.clip import ARCHITECTURES
from models.layers import CLIP_RGB_MEAN, CLIP_RGB_STD, ImagePreprocess

TINY = {"vision_image_size": 32, "vision_patch_size": 8, "vision_hidden_dim": 32, "vision_num_layers": 2,
        "vision_num_heads": 2, "vision_intermediate_dim": 64, "projection_dim": 16, "text_hidden_dim": 16,
        "text_num_layers": 1, "text_num_heads": 2, "text_intermediate_dim": 32, "text_vocabulary_size": 600}


def _images(n=3, size=32, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


@pytest.fixture(scope="module")
def tiny():
    return build_feature_extractor("clip-vit-b32", weights="none", image_size=32, params=TINY, init_seed=3)


def test_tiny_clip_embeds_raw_images_as_unit_vectors(tiny):
    assert tiny.weights_loaded == "random" and tiny.dim == 16 and tiny.image_size == 32
    out = tiny.model.predict(_images(), verbose=0)
    assert out["pooled"].shape == (3, 16) and out["embedding"].shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out["embedding"], out["pooled"] / np.linalg.norm(out["pooled"], axis=1, keepdims=True),
                               atol=1e-5)
    assert np.all(np.isfinite(out["pooled"]))
    assert not np.allclose(out["embedding"][0], out["embedding"][1])


def test_clip_preprocessing_is_inside_the_model(tiny):
    layer = tiny.model.get_layer("preprocess")
    assert layer.mode == "clip"
    x = _images(2, 4)
    expected = (x / 255.0 - np.array(CLIP_RGB_MEAN)) / np.array(CLIP_RGB_STD)
    np.testing.assert_allclose(np.asarray(ImagePreprocess("clip")(x)), expected, rtol=1e-5, atol=1e-5)
    # The extractor equals the bare keras-hub image path on CLIP-normalised pixels.
    trunk = next(layer for layer in tiny.model.layers if isinstance(layer, keras.Model))
    x = _images(2)
    bare = np.asarray(trunk((x / 255.0 - np.array(CLIP_RGB_MEAN, "float32")) / np.array(CLIP_RGB_STD, "float32")))
    np.testing.assert_allclose(tiny.model.predict(x, verbose=0)["pooled"], bare, rtol=1e-4, atol=1e-5)


def test_random_clip_is_seeded(tiny):
    x = _images(2, seed=1)
    again = build_feature_extractor("clip-vit-b32", weights="none", image_size=32, params=TINY, init_seed=3)
    other = build_feature_extractor("clip-vit-b32", weights="none", image_size=32, params=TINY, init_seed=4)
    assert again.init_seed == 3
    np.testing.assert_array_equal(tiny.model.predict(x, verbose=0)["embedding"],
                                  again.model.predict(x, verbose=0)["embedding"])
    assert any(not np.array_equal(a, b) for a, b in zip(tiny.model.get_weights(), other.model.get_weights()))


def test_other_input_sizes_are_resized_to_the_model_size():
    fe = build_feature_extractor("clip-vit-b32", weights="none", image_size=48, params=TINY)
    out = fe.model.predict(_images(2, 48), verbose=0)
    assert out["embedding"].shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, atol=1e-5)


def test_the_named_specs_are_the_published_architectures():
    assert get_spec("clip-vit-b32").native_size == 224 and get_spec("clip-vit-l14-336").native_size == 336
    assert ARCHITECTURES["clip_vit_base_patch32"]["vision_patch_size"] == 32
    assert ARCHITECTURES["clip_vit_base_patch16"]["vision_patch_size"] == 16
    large = ARCHITECTURES["clip_vit_large_patch14"]
    assert (large["vision_hidden_dim"], large["vision_num_layers"], large["vision_num_heads"],
            large["vision_intermediate_dim"], large["projection_dim"]) == (1024, 24, 16, 4096, 768)
    assert ARCHITECTURES["clip_vit_large_patch14_336"]["vision_image_size"] == 336


def test_tags_leave_out_unset_architecture_options_and_keep_folders_safe():
    assert get_spec("clip-vit-b32").tag({}, 0, "imagenet") == "clip-vit-b32-imagenet"
    assert get_spec("clip-vit-l14-336").tag({}, 336, "imagenet") == "clip-vit-l14-336-336-imagenet"
    tiny_tag = get_spec("clip-vit-b32").tag(TINY, 32, "none")
    assert tiny_tag.startswith("clip-vit-b32-img32-p8-w32-l2-h2-mlp64-proj16-") and tiny_tag.endswith("-32-none")
    assert get_spec("clip").tag({}, 0, "imagenet") == "clip-preset-clip_vit_base_patch32-imagenet"
    local = get_spec("clip").tag({"preset": "/data/fashion clip/"}, 0, "imagenet")
    assert "/" not in local and " " not in local and local.startswith("clip-preset-fashion_clip.")


def _offline(monkeypatch):
    import keras_hub

    def no_network(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'api.kaggle.com' (Name or service not known)")
    monkeypatch.setattr(keras_hub.models.CLIPBackbone, "from_preset", no_network)


def test_offline_pretrained_clip_fails_naming_the_preset_and_the_local_folder_option(monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(WeightsUnavailableError) as err:
        build_feature_extractor("clip-vit-b32", weights="imagenet")
    message = str(err.value)
    assert "clip_vit_base_patch32" in message and "clip-vit-b32" in message
    assert "preset=/path/to/folder" in message and "--weights none" in message
    assert "Name or service not known" in message and "\n" not in message


def test_missing_local_preset_folder_is_named(tmp_path):
    folder = tmp_path / "fashion-clip"
    with pytest.raises(ValueError, match="does not exist"):
        get_spec("clip").check({"preset": str(folder)}, 0, "imagenet", "error")
    folder.mkdir()
    with pytest.raises(WeightsUnavailableError) as err:
        build_feature_extractor("clip", weights="imagenet", params={"preset": str(folder)})
    assert str(folder) in str(err.value) and "config.json" in str(err.value)
    assert not get_spec("clip").trunk.pretrained_cached({"preset": str(folder)})


def test_random_fallback_builds_the_random_architecture(monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(WeightsUnavailableError, match="architecture options"):
        build_feature_extractor("clip-vit-b32", weights="imagenet", image_size=32, params=TINY)
    fe = build_feature_extractor("clip-vit-b32", weights="imagenet", image_size=32, params=TINY,
                                 weights_fallback="random")
    assert fe.weights_loaded.startswith("random") and fe.dim == 16


def test_architecture_options_are_checked():
    spec = get_spec("clip-vit-b32")
    with pytest.raises(ValueError, match="no pretrained weights"):
        spec.check(TINY, 32, "imagenet", "error")
    spec.check(TINY, 32, "none", "error")
    spec.check(TINY, 32, "imagenet", "random")
    with pytest.raises(ValueError, match="need one of the presets"):
        get_spec("clip").check({"preset": "clip_vit_h_14_laion2b_s32b_b79k", "vision_num_layers": 2}, 0, "none",
                               "error")


# --------------------------------------------------------------------------- the text tower


@pytest.fixture(scope="module")
def tiny_with_text():
    return build_feature_extractor("clip-vit-b32", weights="none", image_size=32, params=TINY, init_seed=3,
                                   with_text=True)


def test_text_embeddings_are_unit_vectors_of_the_image_space(tiny_with_text):
    text = tiny_with_text.text
    assert text is not None and text.dim == tiny_with_text.dim == 16 and text.tokenizer_source == "byte-level"
    out = text.embed(["a photo of a dress", "Ünïcode — ok?", "", "shirt"], batch_size=3)
    assert out.embedding.shape == (4, 16) and out.pooled.shape == (4, 16)
    np.testing.assert_allclose(np.linalg.norm(out.embedding, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out.embedding, out.pooled / np.linalg.norm(out.pooled, axis=1, keepdims=True),
                               atol=1e-5)
    assert not np.allclose(out.embedding[0], out.embedding[3])
    # Batching changes nothing.
    np.testing.assert_allclose(text.embed(["shirt"]).embedding[0], out.embedding[3], atol=1e-6)


def test_the_text_tower_shares_the_backbones_weights(tiny_with_text):
    # The text model's variables are the CLIP backbone's own (one build, one set of weights):
    # the same seed builds an image tower equal to the one without text.
    again = build_feature_extractor("clip-vit-b32", weights="none", image_size=32, params=TINY, init_seed=3,
                                    with_text=True)
    texts = ["a photo of a dress", "boots"]
    np.testing.assert_array_equal(again.text.embed(texts).embedding, tiny_with_text.text.embed(texts).embedding)
    image_weights = {id(w) for w in tiny_with_text.model.weights}
    assert not image_weights & {id(w) for w in tiny_with_text.text.model.weights}


def test_texts_are_packed_to_77_tokens_and_cuts_are_reported(tiny_with_text):
    text = tiny_with_text.text
    ids, cut = text.tokenize(["ab", "x" * 200])
    start, end = text.tokenizer.start_token_id, text.tokenizer.end_token_id
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    assert ids[0, 0] == start and ids[0, 3] == end and np.all(ids[0, 3:] == end)
    assert ids[1, 0] == start and ids[1, -1] == end and end not in ids[1, 1:-1]
    assert cut.tolist() == [False, True]
    # The end token is the largest id: keras-hub's text pooler finds it with argmax.
    assert end == text.tokenizer.vocabulary_size() - 1 == ids.max()
    assert text.embed(["x" * 200]).truncated.tolist() == [True]


def test_byte_level_vocabulary_encodes_every_byte():
    from models.backbones.clip_text import BYTE_LEVEL_VOCABULARY_SIZE, byte_level_vocabulary, byte_to_unicode

    vocabulary, merges = byte_level_vocabulary()
    assert len(byte_to_unicode()) == 256 and len(set(byte_to_unicode().values())) == 256
    assert len(vocabulary) == BYTE_LEVEL_VOCABULARY_SIZE == 515 and len(set(vocabulary.values())) == 515
    assert vocabulary["<|endoftext|>"] == 514 and merges == ["t h"]
    with pytest.raises(ValueError, match="text_vocabulary_size must be at least 515"):
        get_spec("clip-vit-b32").check({**TINY, "text_vocabulary_size": 64}, 32, "none", "error")


def test_backbones_without_a_text_tower_give_none():
    assert get_spec("clip").has_text and get_spec("clip-vit-l14").has_text
    assert not get_spec("mobilenet").has_text
    fe = build_feature_extractor("mobilenet", weights="none", image_size=32, params={"alpha": 0.25}, with_text=True)
    assert fe.text is None


def test_a_local_keras_hub_preset_brings_its_weights_and_tokenizer(tmp_path, tiny_with_text):
    import keras_hub

    from models.backbones.clip import _BUILT  # noqa: PLC2701  (the test reads the registry of builds)

    trunk = next(layer for layer in tiny_with_text.model.layers if isinstance(layer, keras.Model))
    backbone, _ = _BUILT[trunk]
    folder = tmp_path / "preset"
    backbone.save_to_preset(str(folder))
    tiny_with_text.text.tokenizer.save_to_preset(str(folder))
    fe = build_feature_extractor("clip", weights="imagenet", image_size=32, params={"preset": str(folder)},
                                 with_text=True)
    assert fe.weights_loaded == "imagenet" and fe.text.tokenizer_source == str(folder)
    x = _images(2, seed=5)
    np.testing.assert_allclose(fe.model.predict(x, verbose=0)["embedding"],
                               tiny_with_text.model.predict(x, verbose=0)["embedding"], atol=1e-5)
    texts = ["a photo of a dress", "boots"]
    np.testing.assert_allclose(fe.text.embed(texts).embedding, tiny_with_text.text.embed(texts).embedding, atol=1e-5)
    assert isinstance(fe.text.tokenizer, keras_hub.models.CLIPTokenizer)


def test_random_clip_numbers_its_patch_positions(tiny_with_text):
    # keras-hub leaves position ids at zero until a preset's weights fill them.
    from models.backbones.clip import _BUILT  # noqa: PLC2701

    trunk = next(layer for layer in tiny_with_text.model.layers if isinstance(layer, keras.Model))
    backbone, _ = _BUILT[trunk]
    positions = np.asarray(backbone.vision_encoder.embedding.position_ids)
    np.testing.assert_array_equal(positions, np.arange(1 + (32 // 8) ** 2)[None])


def test_mixed_precision_gives_float32_unit_vectors_for_images_and_texts():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        fe = build_feature_extractor("clip-vit-b32", weights="none", image_size=32, params=TINY, with_text=True)
        out = fe.model.predict(_images(2), verbose=0)
        texts = fe.text.embed(["a photo of a dress", "boots"])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert out["embedding"].dtype == np.float32 and texts.embedding.dtype == np.float32
    assert fe.text.model.outputs[1].dtype == "float32"
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(texts.embedding, axis=1), 1.0, atol=1e-3)
    assert np.isfinite(out["pooled"]).all() and np.isfinite(texts.pooled).all()
