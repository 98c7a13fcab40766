"""Hugging Face CLIP folders -> keras-hub presets, checked against transformers' own outputs (no torch here).

The fixture (tests/fixtures/hf_clip_tiny, written by tools/make_clip_fixture.py with torch + transformers)
holds a tiny random CLIPModel in both weight layouts, its BPE tokenizer files, and reference.npz: what
transformers computed for seeded images and five texts.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.backbones import hf_clip

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hf_clip_tiny"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURE / "reference.npz"))


def _pixel_values(reference):
    # The exact expression the fixture script fed transformers (there channels first).
    images = reference["images_uint8"].astype(np.float32)
    return ((images / 255.0 - reference["clip_mean"]) / reference["clip_std"]).astype(np.float32)


def _copy_fixture(tmp_path: Path, without: tuple[str, ...] = ()) -> Path:
    folder = tmp_path / "hf"
    shutil.copytree(FIXTURE, folder, ignore=shutil.ignore_patterns("reference.npz", *without))
    return folder


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _embeddings(preset: Path, reference):
    import keras_hub

    backbone = keras_hub.models.CLIPBackbone.from_preset(str(preset))
    image = np.asarray(backbone.get_vision_embeddings(_pixel_values(reference)))
    text = np.asarray(backbone.get_text_embeddings(reference["input_ids"]))
    return backbone, image, text


def _max_gaps(image, text, reference):
    return {"image": float(np.abs(image - reference["image_features"]).max()),
            "text": float(np.abs(text - reference["text_features"]).max()),
            "image_normalized": float(np.abs(_unit(image) - reference["image_features_normalized"]).max()),
            "text_normalized": float(np.abs(_unit(text) - reference["text_features_normalized"]).max())}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return hf_clip.convert_hf_clip(FIXTURE, tmp_path_factory.mktemp("conv") / "tiny")


def test_fixture_is_recognised_and_small():
    assert hf_clip.is_hf_clip_folder(FIXTURE) and not hf_clip.is_keras_hub_preset(FIXTURE)
    assert sum(p.stat().st_size for p in FIXTURE.iterdir()) < 300_000


def test_converted_embeddings_match_transformers(converted, reference):
    assert hf_clip.is_keras_hub_preset(converted) and not hf_clip.is_hf_clip_folder(converted)
    _, image, text = _embeddings(converted, reference)
    gaps = _max_gaps(image, text, reference)
    print("max abs differences vs transformers (safetensors):", gaps)
    assert max(gaps.values()) <= TOLERANCE, gaps
    # Not trivially close: the embeddings differ between inputs by far more than the tolerance.
    assert np.abs(image[0] - image[1]).max() > 100 * TOLERANCE
    assert np.abs(text[0] - text[1]).max() > 100 * TOLERANCE


def test_keras_hub_tokenizer_gives_the_hf_ids(converted, reference):
    import keras_hub

    tokenizer = keras_hub.models.CLIPTokenizer.from_preset(str(converted))
    preprocessor = keras_hub.models.CLIPPreprocessor.from_preset(str(converted))
    assert preprocessor.sequence_length == 77 and tokenizer.end_token_id == 539
    texts = np.array([str(t) for t in reference["texts"]])
    token_ids = np.asarray(preprocessor({"images": None, "prompts": texts})["token_ids"])
    for ids, hf_ids, length in zip(token_ids, reference["input_ids"], reference["input_lengths"]):
        assert ids[:length].tolist() == hf_ids[:length].tolist()  # start ... end, no padding
        assert ids[0] == tokenizer.start_token_id and ids[length - 1] == tokenizer.end_token_id
    # keras-hub pads with the end token as the HF tokenizer does, so even the padded rows agree.
    np.testing.assert_array_equal(token_ids, reference["input_ids"])


def test_tf_h5_layout_converts_to_the_same_weights(tmp_path, converted, reference, capsys):
    # tf_model.h5 here is written by tools/make_clip_fixture.py in transformers 4.x TFCLIPModel's layout
    # (transformers 5 writes no TF weights), from the same tensors as model.safetensors.
    source = _copy_fixture(tmp_path, without=("model.safetensors",))
    assert hf_clip.main([str(source), str(tmp_path / "from_h5")]) == 0
    assert capsys.readouterr().out.strip() == str((tmp_path / "from_h5").resolve())
    record = json.loads((tmp_path / "from_h5" / hf_clip.COMPLETE_MARKER).read_text())
    assert record["weights"] == hf_clip.TF_H5
    backbone, image, text = _embeddings(tmp_path / "from_h5", reference)
    gaps = _max_gaps(image, text, reference)
    print("max abs differences vs transformers (tf_model.h5):", gaps)
    assert max(gaps.values()) <= TOLERANCE, gaps
    import keras_hub

    from_safetensors = keras_hub.models.CLIPBackbone.from_preset(str(converted))
    for a, b in zip(backbone.get_weights(), from_safetensors.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_sharded_safetensors_and_tokenizer_json_only(tmp_path, converted, reference):
    # transformers 5's tokenizer.save_pretrained writes only tokenizer.json (no vocab.json / merges.txt), and
    # large checkpoints come as shards with an index.
    from safetensors.numpy import load_file, save_file

    source = _copy_fixture(tmp_path, without=("model.safetensors", "tf_model.h5", "vocab.json", "merges.txt"))
    tensors = load_file(FIXTURE / "model.safetensors")
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in tensors.items() if k.startswith("vision")},
              "model-00002-of-00002.safetensors": {k: v for k, v in tensors.items() if not k.startswith("vision")}}
    for name, part in shards.items():
        save_file(part, source / name)
    weight_map = {key: name for name, part in shards.items() for key in part}
    (source / hf_clip.SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert hf_clip.read_tokenizer_files(source) == hf_clip.read_tokenizer_files(FIXTURE)
    dest = hf_clip.convert_hf_clip(source, tmp_path / "out")
    import keras_hub

    for a, b in zip(keras_hub.models.CLIPBackbone.from_preset(str(dest)).get_weights(),
                    keras_hub.models.CLIPBackbone.from_preset(str(converted)).get_weights()):
        np.testing.assert_array_equal(a, b)
    preprocessor = keras_hub.models.CLIPPreprocessor.from_preset(str(dest))
    texts = np.array([str(t) for t in reference["texts"]])
    np.testing.assert_array_equal(preprocessor({"images": None, "prompts": texts})["token_ids"], reference["input_ids"])
    # An index that lists a tensor no shard holds is refused.
    weight_map["text_model.extra"] = "model-00002-of-00002.safetensors"
    (source / hf_clip.SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(hf_clip.HFCLIPError, match=r"listed only \['text_model.extra'\]"):
        hf_clip.convert_hf_clip(source, tmp_path / "again")


def test_pickle_only_folder_is_refused_without_unpickling(tmp_path, capsys):
    source = _copy_fixture(tmp_path, without=("model.safetensors", "tf_model.h5"))
    (source / "pytorch_model.bin").write_bytes(b"not a pickle: loading it would fail loudly")
    with pytest.raises(hf_clip.HFCLIPError, match=r"safe_serialization=True") as info:
        hf_clip.convert_hf_clip(source, tmp_path / "out")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()
    assert hf_clip.main([str(source), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pytorch_model.bin" in err


@pytest.mark.parametrize("missing, named", [("merges.txt", "merges.txt"),
                                            (("model.safetensors", "tf_model.h5"), "model.safetensors")])
def test_missing_files_name_the_file_and_folder(tmp_path, missing, named):
    missing = (missing,) if isinstance(missing, str) else missing
    source = _copy_fixture(tmp_path, without=missing + (("tokenizer.json",) if named == "merges.txt" else ()))
    with pytest.raises(FileNotFoundError, match=named) as info:
        hf_clip.convert_hf_clip(source, tmp_path / "out")
    assert str(source.resolve()) in str(info.value) and "\n" not in str(info.value)


def test_tampered_checkpoint_fails_listing_the_names(tmp_path):
    from safetensors.numpy import load_file, save_file

    source = _copy_fixture(tmp_path, without=("tf_model.h5",))
    tensors = load_file(source / "model.safetensors")
    del tensors["vision_model.post_layernorm.bias"]
    tensors["text_model.encoder.layers.2.mlp.fc1.weight"] = np.zeros((16, 8), np.float32)
    tensors["text_model.embeddings.position_ids"] = np.arange(77)[None]  # a known buffer: ignored
    save_file(tensors, source / "model.safetensors")
    with pytest.raises(hf_clip.HFCLIPError) as info:
        hf_clip.convert_hf_clip(source, tmp_path / "out")
    message = str(info.value)
    assert "missing tensors ['vision_model.post_layernorm.bias']" in message
    assert "unused tensors ['text_model.encoder.layers.2.mlp.fc1.weight']" in message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_misshapen_tensor_and_unsupported_config_are_refused(tmp_path):
    config = json.loads((FIXTURE / "config.json").read_text())
    arch = hf_clip.read_architecture(config)
    assert (arch.vision["hidden_dim"], arch.text["hidden_dim"], arch.projection_dim) == (24, 8, 16)
    from safetensors.numpy import load_file

    tensors = load_file(FIXTURE / "model.safetensors")
    tensors["visual_projection.weight"] = tensors["visual_projection.weight"][:15]
    with pytest.raises(hf_clip.HFCLIPError, match=r"visual_projection.weight \(15, 24\)"):
        hf_clip.load_hf_weights(hf_clip.build_backbone(arch), arch, tensors)
    config["text_config"]["hidden_act"] = "gelu_new"
    with pytest.raises(hf_clip.HFCLIPError, match="gelu_new"):
        hf_clip.read_architecture(config)
    config["text_config"]["hidden_act"] = "quick_gelu"
    config["vision_config"]["layer_norm_eps"] = 1e-3
    with pytest.raises(hf_clip.HFCLIPError, match="layer_norm_eps"):
        hf_clip.read_architecture(config)


def test_tf_names_map_to_torch_layout():
    kernel = np.arange(6, dtype=np.float32).reshape(2, 3)
    name, value = hf_clip.tf_name_to_hf("clip/tf_clip_model/clip/text_model/encoder/layers_._1/mlp/fc2/kernel:0",
                                        kernel)
    assert name == "text_model.encoder.layers.1.mlp.fc2.weight" and np.array_equal(value, kernel.T)
    conv = np.zeros((8, 8, 3, 24), np.float32)
    name, value = hf_clip.tf_name_to_hf("clip/tf_clip_model/clip/vision_model/embeddings/patch_embedding/kernel:0",
                                        conv)
    assert name == "vision_model.embeddings.patch_embedding.weight" and value.shape == (24, 3, 8, 8)
    assert hf_clip.tf_name_to_hf("clip/tf_clip_model/clip/logit_scale:0", np.ones(1))[1].shape == ()
    assert hf_clip.tf_name_to_hf("a/clip/vision_model/pre_layrnorm/gamma:0", np.ones(2))[0] == \
        "vision_model.pre_layrnorm.weight"


def test_preset_for_converts_once_then_reuses(tmp_path, monkeypatch):
    source = _copy_fixture(tmp_path, without=("tf_model.h5",))
    calls = []
    real = hf_clip.convert_hf_clip
    monkeypatch.setattr(hf_clip, "convert_hf_clip", lambda src, dest: calls.append(dest) or real(src, dest))
    first = hf_clip.keras_hub_preset_for(source, cache_dir=tmp_path / "cache")
    assert first.parent == tmp_path / "cache" / "clip-converted" and first.name.startswith("hf-")
    written = (first / "model.weights.h5").stat().st_mtime_ns
    again = hf_clip.keras_hub_preset_for(source, cache_dir=tmp_path / "cache")
    assert again == first and len(calls) == 1 and (first / "model.weights.h5").stat().st_mtime_ns == written
    assert hf_clip.keras_hub_preset_for(first) == first  # a keras-hub preset is returned as it is
    monkeypatch.setenv("EMBEDLAB_CACHE", str(tmp_path / "env-cache"))
    assert hf_clip.default_cache_dir() == tmp_path / "env-cache"
    (source / "config.json").write_text((source / "config.json").read_text() + "\n")  # an edited checkpoint
    assert hf_clip.source_fingerprint(source) not in first.name
    with pytest.raises(ValueError, match="neither a keras-hub preset folder nor a Hugging Face CLIP"):
        hf_clip.keras_hub_preset_for(tmp_path / "cache")


def test_destination_with_files_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        hf_clip.convert_hf_clip(FIXTURE, tmp_path / "dest")
    assert (tmp_path / "dest" / "keep.txt").read_text() == "mine"
    assert hf_clip.main([str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_hf_folder_as_the_clip_backbone_reproduces_transformers(tmp_path, monkeypatch, reference):
    """The whole path a user takes: `--backbone clip --backbone-param preset=/hf/folder`, raw pixels in."""
    from models.backbones import build_feature_extractor, get_spec

    monkeypatch.setenv("EMBEDLAB_CACHE", str(tmp_path / "cache"))
    source = _copy_fixture(tmp_path, without=("tf_model.h5",))
    assert get_spec("clip").trunk.pretrained_cached({"preset": str(source)})
    extractor = build_feature_extractor("clip", weights="imagenet", image_size=32, params={"preset": str(source)},
                                        with_text=True)
    assert extractor.weights_loaded == "imagenet" and extractor.dim == 16
    out = extractor.model.predict(reference["images_uint8"].astype(np.float32), verbose=0)
    assert np.abs(out["pooled"] - reference["image_features"]).max() <= TOLERANCE
    assert np.abs(out["embedding"] - reference["image_features_normalized"]).max() <= TOLERANCE
    texts = extractor.text.embed([str(t) for t in reference["texts"]])
    assert np.abs(texts.embedding - reference["text_features_normalized"]).max() <= TOLERANCE
    assert list((tmp_path / "cache" / "clip-converted").iterdir())  # converted once, into the cache


def test_unconvertible_hf_folder_is_one_line_through_the_backbone(tmp_path):
    from models.backbones import WeightsUnavailableError, build_feature_extractor

    source = _copy_fixture(tmp_path, without=("tf_model.h5", "model.safetensors"))
    (source / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(WeightsUnavailableError) as err:
        build_feature_extractor("clip", weights="imagenet", image_size=32, params={"preset": str(source)})
    assert "pytorch_model.bin" in str(err.value) and "safe_serialization=True" in str(err.value)
    assert "\n" not in str(err.value)
