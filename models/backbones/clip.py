"""CLIP backbones on keras-hub's `CLIPBackbone`: ViT-B/32, B/16, L/14, L/14-336 and a generic `clip`.

The trunk is CLIP's image path: (resize to the model's image size) -> vision encoder -> pooled
class token -> vision projection, i.e. keras-hub's `get_vision_embeddings`. It returns pooled
vectors, so the extractor adds no pooling; `build_feature_extractor` L2-normalises them. CLIP's
mean/std runs in `ImagePreprocess("clip")`, so the extractor still takes raw RGB in [0, 255].

`pretrained` loads a keras-hub preset (`from_preset`: a keras-hub preset name, fetched and cached
by keras-hub, or a local preset folder). `random` builds the published architecture from
hyper-parameters written down here; the `vision_*` / `text_*` / `projection_dim` options override
them (0 = the preset's value), which is how tests make a tiny CLIP. keras-hub is imported only
when a trunk is built, so importing the registry stays free of TensorFlow.
"""
from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.backbones.clip_text import BYTE_LEVEL_VOCABULARY_SIZE, CLIPTextEmbedder
from models.backbones.hf_clip import HFCLIPError, keras_hub_preset_for
from models.backbones.registry import BackboneSpec, Param, TrunkRequest, register
from models.backbones.weights import WeightsUnavailableError, short_reason

# The published architectures of OpenAI's CLIP models (keras-hub's presets of the same names).
_TEXT_B = {"text_hidden_dim": 512, "text_num_layers": 12, "text_num_heads": 8, "text_intermediate_dim": 2048}
_TEXT_L = {"text_hidden_dim": 768, "text_num_layers": 12, "text_num_heads": 12, "text_intermediate_dim": 3072}
_VISION_B = {"vision_hidden_dim": 768, "vision_num_layers": 12, "vision_num_heads": 12,
             "vision_intermediate_dim": 3072, "projection_dim": 512}
_VISION_L = {"vision_hidden_dim": 1024, "vision_num_layers": 24, "vision_num_heads": 16,
             "vision_intermediate_dim": 4096, "projection_dim": 768}
_COMMON = {"text_vocabulary_size": 49408}
ARCHITECTURES: dict[str, dict[str, int]] = {
    "clip_vit_base_patch32": {**_VISION_B, **_TEXT_B, **_COMMON, "vision_image_size": 224, "vision_patch_size": 32},
    "clip_vit_base_patch16": {**_VISION_B, **_TEXT_B, **_COMMON, "vision_image_size": 224, "vision_patch_size": 16},
    "clip_vit_large_patch14": {**_VISION_L, **_TEXT_L, **_COMMON, "vision_image_size": 224, "vision_patch_size": 14},
    "clip_vit_large_patch14_336": {**_VISION_L, **_TEXT_L, **_COMMON, "vision_image_size": 336,
                                   "vision_patch_size": 14},
}
MAX_SEQUENCE_LENGTH = 77

# Architecture overrides: 0 keeps the preset's value; they appear in the tag only when set.
_OVERRIDES = {
    "vision_image_size": ("img", "CLIP: the vision encoder's input side (inputs are resized to it)"),
    "vision_patch_size": ("p", "CLIP: vision patch size"),
    "vision_hidden_dim": ("w", "CLIP: vision width"),
    "vision_num_layers": ("l", "CLIP: vision transformer blocks"),
    "vision_num_heads": ("h", "CLIP: vision attention heads"),
    "vision_intermediate_dim": ("mlp", "CLIP: vision MLP width"),
    "projection_dim": ("proj", "CLIP: embedding (projection) size"),
    "text_hidden_dim": ("tw", "CLIP: text width"),
    "text_num_layers": ("tl", "CLIP: text transformer blocks"),
    "text_num_heads": ("th", "CLIP: text attention heads"),
    "text_intermediate_dim": ("tmlp", "CLIP: text MLP width"),
    "text_vocabulary_size": ("tv", "CLIP: text vocabulary size"),
}
_OVERRIDE_PARAMS = {key: Param(0, help=f"{text} (0 = the preset's; random weights only)", tag_label=label,
                               tag_when_default=False)
                    for key, (label, text) in _OVERRIDES.items()}


def _is_local(preset: str) -> bool:
    return preset.startswith((".", "/", "~")) or os.sep in preset or Path(preset).expanduser().exists()


# Each vision trunk built here -> (its CLIPBackbone, where its tokenizer comes from), so that the text
# tower of the very same weights can be had later (`KerasHubCLIP.text_embedder`) without the trunk
# model owning the text layers (which would count them in its weights, saves and exports).
_BUILT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _kagglehub_cache() -> Path:
    return Path(os.environ.get("KAGGLEHUB_CACHE", "~/.cache/kagglehub")).expanduser()


@dataclass(frozen=True)
class KerasHubCLIP:
    """A CLIP trunk from keras-hub: `preset` fixed (a named spec) or taken from the `preset` option."""

    preset: str | None = None

    def preset_of(self, params: Mapping[str, Any]) -> str:
        return self.preset or str(params["preset"])

    def overrides(self, params: Mapping[str, Any]) -> dict[str, int]:
        return {key: int(params[key]) for key in _OVERRIDES if int(params.get(key, 0) or 0) != 0}

    # ----------------------------------------------------------------- TrunkBuilder

    def random(self, request: TrunkRequest):
        preset = self.preset_of(request.params)
        overrides = self.overrides(request.params)
        if preset in ARCHITECTURES:
            backbone = _backbone_from_hyperparameters({**ARCHITECTURES[preset], **overrides})
        elif overrides:
            raise ValueError(f"backbone {request.backbone!r}: architecture options {sorted(overrides)} need a preset "
                             f"whose architecture embedlab knows ({', '.join(sorted(ARCHITECTURES))})")
        else:
            backbone, source = self._from_preset(request, load_weights=False)
            return self._remember(_vision_trunk(backbone, request.input_shape, request.backbone), backbone, source)
        # Random weights from hyper-parameters come with no tokenizer files: the byte-level one.
        return self._remember(_vision_trunk(backbone, request.input_shape, request.backbone), backbone, None)

    def pretrained(self, request: TrunkRequest):
        overrides = self.overrides(request.params)
        if overrides:
            raise WeightsUnavailableError(
                f"backbone {request.backbone!r} has no pretrained weights with the architecture options "
                f"{sorted(overrides)} (they are for random weights: run with --weights none)")
        backbone, source = self._from_preset(request, load_weights=True)
        return self._remember(_vision_trunk(backbone, request.input_shape, request.backbone), backbone, source)

    def text_embedder(self, trunk) -> CLIPTextEmbedder:
        """The text tower of the CLIP whose image tower `trunk` is (same weights), with its tokenizer."""
        import keras_hub

        from models.backbones.clip_text import byte_level_tokenizer, text_model

        backbone, source = _BUILT[trunk]
        if source is None:
            tokenizer, described = byte_level_tokenizer(), "byte-level"
        else:
            try:
                tokenizer, described = keras_hub.models.CLIPTokenizer.from_preset(source), source
            except Exception as exc:  # offline or an incomplete folder: say which, as for the weights
                raise WeightsUnavailableError(
                    f"the CLIP tokenizer of preset {source!r} is not available ({short_reason(exc)}); a keras-hub "
                    f"preset folder holds it under assets/tokenizer/ (vocabulary.json, merges.txt)") from exc
        return CLIPTextEmbedder(tokenizer=tokenizer, model=text_model(backbone, trunk.name.removesuffix("_vision")),
                                tokenizer_source=described)

    def trunk_with_tokens(self, trunk, images):
        """(the projected image embedding, the vision encoder's sequence output (batch, 1 + patches, width)).

        The sequence is taken after the encoder's final (post) layer norm, which keras-hub applies to every
        token: its class token (position 0) is exactly what CLIP's pooler hands the projection, so the cached
        tokens and the pooled vector describe one state of the network; and each token comes out normalised,
        scaled by the trained gain, so the float16 cache holds values of order one (the residual stream
        before the norm carries outlier channels far larger). The head's own LayerNorm comes next anyway.
        """
        backbone, _ = _BUILT[trunk]
        x = images
        if any(layer.name == "clip_resize" for layer in trunk.layers):
            x = trunk.get_layer("clip_resize")(x)
        sequence = backbone.vision_encoder({"images": x})
        return backbone.vision_projection(backbone.vision_pooler(sequence)), sequence

    def finetune_units(self, trunk) -> list:
        """Input to output: the patch and position embedding, the pre layer norm, each transformer block,
        the post layer norm, the vision projection (`finetune_layers: N` trains the last N of them)."""
        import keras_hub

        encoder = next(layer for layer in trunk.layers if isinstance(layer, keras_hub.models.CLIPVisionEncoder))
        return [encoder.embedding, encoder.pre_layer_norm, *encoder.encoder_layers, encoder.layer_norm,
                trunk.get_layer("vision_projection")]

    @staticmethod
    def _remember(trunk, backbone, tokenizer_source: str | None):
        _BUILT[trunk] = (backbone, tokenizer_source)
        return trunk

    def _source(self, request: TrunkRequest) -> str:
        preset = self.preset_of(request.params)
        return str(Path(preset).expanduser()) if _is_local(preset) else preset

    def pretrained_cached(self, params: Mapping[str, Any]) -> bool:
        preset = self.preset_of(params)
        if _is_local(preset):
            return (Path(preset).expanduser() / "config.json").is_file()
        return any(_kagglehub_cache().glob(f"models/keras/clip/keras/{preset}/*/config.json"))

    def check(self, params: Mapping[str, Any], pretrained: bool) -> None:
        preset = self.preset_of(params)
        overrides = self.overrides(params)
        if pretrained and overrides:
            raise ValueError(f"CLIP architecture options {sorted(overrides)} have no pretrained weights: "
                             f"use --weights none")
        vocabulary = overrides.get("text_vocabulary_size", BYTE_LEVEL_VOCABULARY_SIZE)
        if vocabulary < BYTE_LEVEL_VOCABULARY_SIZE:
            raise ValueError(f"CLIP text_vocabulary_size must be at least {BYTE_LEVEL_VOCABULARY_SIZE} (the byte-level "
                             f"tokenizer of random-weights CLIPs), got {vocabulary}")
        if overrides and preset not in ARCHITECTURES:
            raise ValueError(f"CLIP architecture options {sorted(overrides)} need one of the presets "
                             f"{', '.join(sorted(ARCHITECTURES))}, not {preset!r}")
        if _is_local(preset) and not Path(preset).expanduser().is_dir():
            raise ValueError(f"CLIP preset folder {preset} does not exist")

    # ----------------------------------------------------------------- keras-hub

    def _from_preset(self, request: TrunkRequest, load_weights: bool):
        """(the CLIPBackbone, the keras-hub preset it came from: its tokenizer is there too)."""
        import keras_hub

        preset = self.preset_of(request.params)
        local = _is_local(preset)
        source = self._source(request)
        try:
            if local:
                # A Hugging Face CLIP folder is converted once into a keras-hub preset (models/backbones/hf_clip.py).
                source = str(keras_hub_preset_for(source))
            return keras_hub.models.CLIPBackbone.from_preset(source, load_weights=load_weights), source
        except HFCLIPError as exc:  # a Hugging Face folder that cannot be converted says why itself
            raise WeightsUnavailableError(f"backbone {request.backbone!r}: {exc}") from exc
        except Exception as exc:  # offline, missing files, not a keras-hub preset: all mean "not available"
            what = "weights" if load_weights else "architecture (config.json)"
            if local:
                where = (f"the folder {source} is not a loadable keras-hub CLIP preset (it needs config.json"
                         f"{' and model.weights.h5' if load_weights else ''}, as `CLIPBackbone.save_to_preset` "
                         f"writes them)")
            else:
                where = (f"keras-hub could not fetch preset {preset!r} (it caches presets under "
                         f"{_kagglehub_cache()}; set KAGGLEHUB_CACHE to a folder that holds it)")
            raise WeightsUnavailableError(
                f"pretrained {what} for backbone {request.backbone!r} (keras-hub preset {preset!r}) are not "
                f"available: {where} ({short_reason(exc)}). Give a local keras-hub preset folder as backbone "
                f"'clip' with --backbone-param preset=/path/to/folder, or run with --weights none."
            ) from exc


def _backbone_from_hyperparameters(arch: Mapping[str, int]):
    import keras_hub

    size = arch["vision_image_size"]
    vision = keras_hub.models.CLIPVisionEncoder(
        patch_size=arch["vision_patch_size"], hidden_dim=arch["vision_hidden_dim"],
        num_layers=arch["vision_num_layers"], num_heads=arch["vision_num_heads"],
        intermediate_dim=arch["vision_intermediate_dim"], image_shape=(size, size, 3))
    text = keras_hub.models.CLIPTextEncoder(
        vocabulary_size=arch["text_vocabulary_size"], embedding_dim=arch["text_hidden_dim"],
        hidden_dim=arch["text_hidden_dim"], num_layers=arch["text_num_layers"], num_heads=arch["text_num_heads"],
        intermediate_dim=arch["text_intermediate_dim"], max_sequence_length=MAX_SEQUENCE_LENGTH)
    # keras-hub creates the patch position ids as zeros and relies on a preset's weights to fill them;
    # a random build must number them itself, or every patch gets the same position embedding.
    positions = vision.embedding.position_ids
    positions.assign(np.arange(positions.shape[-1], dtype=positions.dtype)[None])
    return keras_hub.models.CLIPBackbone(vision_encoder=vision, text_encoder=text,
                                         projection_dim=arch["projection_dim"])


def _vision_trunk(backbone, input_shape: tuple[int, int, int], name: str):
    """Images (CLIP-normalised, any square size) -> the projected pooled vision output."""
    import keras

    images = keras.Input(shape=input_shape, name="clip_images")
    x = images
    height, width = backbone.vision_encoder.image_shape[:2]
    if tuple(input_shape[:2]) != (height, width):
        # CLIP resizes with bicubic interpolation (PIL, antialiased); inputs here are square, so its
        # centre crop is the whole image.
        x = keras.layers.Resizing(height, width, interpolation="bicubic", antialias=True, name="clip_resize")(x)
    embedding = backbone.get_vision_embeddings(x)
    return keras.Model(images, embedding, name=f"{name.replace('-', '_')}_vision")


def _named_spec(name: str, preset: str, label: str) -> BackboneSpec:
    arch = ARCHITECTURES[preset]
    return BackboneSpec(
        name=name, native_size=arch["vision_image_size"], preprocess="clip", trunk=KerasHubCLIP(preset),
        params=dict(_OVERRIDE_PARAMS),
        description=f"CLIP {label} (Radford et al. 2021; keras-hub preset {preset}), {arch['projection_dim']}-d",
    )


register(_named_spec("clip-vit-b32", "clip_vit_base_patch32", "ViT-B/32"))
register(_named_spec("clip-vit-b16", "clip_vit_base_patch16", "ViT-B/16"))
register(_named_spec("clip-vit-l14", "clip_vit_large_patch14", "ViT-L/14"))
register(_named_spec("clip-vit-l14-336", "clip_vit_large_patch14_336", "ViT-L/14 at 336 px"))
register(BackboneSpec(
    name="clip", native_size=224, preprocess="clip", trunk=KerasHubCLIP(),
    params={"preset": Param("clip_vit_base_patch32", help="CLIP: a keras-hub preset name or a local preset folder",
                            tag_label="preset-"),
            **_OVERRIDE_PARAMS},
    description="CLIP from any keras-hub preset or local keras-hub preset folder (params.preset)",
))
