"""Backbone registry: a name -> a spec that describes the backbone completely.

A spec owns its native input size, its preprocessing, its options (a params dict with
defaults, e.g. MobileNet's width multiplier), the tag its artifacts are filed under, and
how its trunk is built (a `TrunkBuilder`: `keras_apps.KerasApplication` today; a keras-hub
`from_preset` builder is one more class with the same three methods). Code outside this
package names no backbone and no backbone option.

Every feature extractor has the same shape: raw RGB pixels in [0, 255] -> `ImagePreprocess`
-> trunk -> global average pooling ("pooled", the raw features) -> `L2Normalize`
("embedding", unit vectors). A trunk that returns pooled vectors itself (a CLIP vision
encoder) skips the pooling.

Importing this package does not import Keras or TensorFlow (a spec is data; its builder
imports Keras when it builds), so the command line checks names, options and sizes at once.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from models.backbones.weights import WeightsUnavailableError, load_weights_file

if TYPE_CHECKING:
    import keras

__all__ = ["WeightsUnavailableError", "Param", "TrunkRequest", "TrunkBuilder", "BackboneSpec", "BACKBONES",
           "register", "get_spec", "parameter_help", "FeatureExtractor", "TextTowerBuilder", "build_feature_extractor",
           "seeded_initialisation", "FinetunableTrunkBuilder", "finetune_units", "TokenTrunkBuilder"]

log = logging.getLogger("embedlab.backbones")


@dataclass(frozen=True)
class Param:
    """One option of a backbone."""

    default: bool | int | float | str
    help: str = ""
    # How the option appears in the artifact tag: this label followed by the value ("a" -> "a0.25").
    tag_label: str = ""
    # False: the option is left out of the tag while it has its default (architecture overrides that
    # are 0, "the preset's value", for almost every run).
    tag_when_default: bool = True


@dataclass(frozen=True)
class TrunkRequest:
    backbone: str                          # the registry name, for messages
    input_shape: tuple[int, int, int]
    params: Mapping[str, Any]              # resolved: every option of the spec, defaults filled in


class TrunkBuilder(Protocol):
    """How a spec makes its trunk (the network before pooling).

    A builder may also say which parts of its trunk fine-tuning counts (`FinetunableTrunkBuilder`);
    one that does not has the trunk's own layers counted (`finetune_units`).
    """

    def random(self, request: TrunkRequest) -> keras.Model:
        """The trunk from a random initialisation."""

    def pretrained(self, request: TrunkRequest) -> keras.Model:
        """The trunk with its published pretrained weights; `WeightsUnavailableError` when they cannot be had."""

    def pretrained_cached(self, params: Mapping[str, Any]) -> bool:
        """Whether the pretrained weights are already on this machine (no download needed)."""

    def check(self, params: Mapping[str, Any], pretrained: bool) -> None:
        """Raise ValueError for options this trunk cannot honour (e.g. no pretrained weights exist for them)."""


class TextTowerBuilder(Protocol):
    """A trunk builder whose models also read text (CLIP): the text tower that shares the trunk's weights."""

    def text_embedder(self, trunk: keras.Model) -> Any:
        """An object with `embed(texts) -> TextEmbeddings`, `tokenize`, `dim` (models/backbones/clip_text.py)."""


class FinetunableTrunkBuilder(Protocol):
    """A trunk builder that names the units fine-tuning counts (phase 3, finetune mode)."""

    def finetune_units(self, trunk: keras.Model) -> list[keras.layers.Layer]:
        """The trunk's trainable units in order, input to output; `train.finetune_layers: N` trains the last N.

        Together they must hold every variable of the trunk (a transformer's blocks live inside one
        nested encoder layer, so the trunk's own `layers` would not name them).
        """


class TokenTrunkBuilder(Protocol):
    """A trunk builder that says how its token sequence is had (CLIP: the vision encoder's sequence output).

    Builders without it give the trunk's last feature map, its H x W positions as tokens (keras.applications).
    """

    def trunk_with_tokens(self, trunk: keras.Model, images) -> tuple[Any, Any]:
        """(the trunk's output, its tokens (batch, T, C)) for the symbolic, preprocessed `images`, from the
        layers (and so the weights) of `trunk`."""


def finetune_units(name: str, trunk: keras.Model) -> list[keras.layers.Layer]:
    """The ordered trainable units of backbone `name`'s `trunk`: its builder's `finetune_units`, else the
    trunk's own layers."""
    units = getattr(get_spec(name).trunk, "finetune_units", None)
    return list(units(trunk)) if callable(units) else list(trunk.layers)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    native_size: int
    preprocess: str                        # an ImagePreprocess mode
    trunk: TrunkBuilder
    params: Mapping[str, Param] = field(default_factory=dict)
    min_size: int = 32                     # smallest input side the trunk accepts
    # Keys that older configs wrote for every backbone, with the value those configs' fingerprints saw.
    # They are accepted and ignored, and stay in fingerprints so that finished artifacts stay current.
    legacy_keys: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def has_text(self) -> bool:
        """Whether the backbone embeds texts into its image space (a `TextTowerBuilder` trunk)."""
        return callable(getattr(self.trunk, "text_embedder", None))

    def resolve_params(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """Every option of this backbone: the given values (coerced to the default's type), else defaults."""
        given = dict(given or {})
        unknown = sorted(k for k in given if k not in self.params and k not in self.legacy_keys)
        if unknown:
            known = ", ".join(sorted(self.params)) or "none"
            raise ValueError(f"backbone {self.name!r} has no parameter(s) {unknown} (its parameters: {known})")
        return {key: _coerce(key, given.get(key, param.default), param.default) for key, param in self.params.items()}

    def fingerprint_params(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """The options as a fingerprint sees them (legacy keys included, see `legacy_keys`)."""
        return {**self.legacy_keys, **self.resolve_params(given)}

    def tag(self, given: Mapping[str, Any] | None, image_size: int, weights: str) -> str:
        """The folder name of this backbone's artifacts, e.g. `resnet50-imagenet`, `mobilenet-a0.25-96-imagenet`."""
        parts = [self.name]
        parts += [f"{self.params[key].tag_label or key}{_format(value)}"
                  for key, value in self.resolve_params(given).items()
                  if self.params[key].tag_when_default or value != self.params[key].default]
        if image_size:
            parts.append(str(image_size))
        parts.append(weights if weights in ("imagenet", "none") else "custom")
        return "-".join(parts)

    def check(self, given: Mapping[str, Any] | None, image_size: int, weights: str, weights_fallback: str) -> None:
        """Raise ValueError for settings this backbone cannot run with, before any work starts."""
        params = self.resolve_params(given)
        if image_size != 0 and image_size < self.min_size:
            raise ValueError(f"image_size must be at least {self.min_size} px for backbone {self.name!r} "
                             f"(or 0 for its native {self.native_size}), got {image_size}")
        # With the random fallback, missing pretrained weights are not an error.
        self.trunk.check(params, pretrained=weights == "imagenet" and weights_fallback != "random")


def _coerce(key: str, value: Any, default: Any) -> Any:
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return str(value).lower() in ("1", "true", "yes", "on")
    elif kind in (int, float) and not isinstance(value, bool):
        try:
            number = kind(value)
        except (TypeError, ValueError):
            pass
        else:
            if kind is float or float(value) == number:
                return number
    elif kind is str:
        return str(value)
    raise ValueError(f"parameter {key!r} expects a {kind.__name__}, got {value!r}")


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    if isinstance(value, str) and not re.fullmatch(r"[A-Za-z0-9._]+", text):
        # A tag is a folder name: a path or free text becomes its last part, made safe, plus a short
        # hash of the whole value (two folders named alike stay apart).
        stem = re.sub(r"[^A-Za-z0-9._]+", "_", text.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]).strip("_")
        text = f"{stem or 'x'}.{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return text


BACKBONES: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    BACKBONES[spec.name] = spec
    return spec


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}") from None


def parameter_help() -> dict[str, str]:
    """Every option some registered backbone takes -> its help (the command line offers each as a flag)."""
    options: dict[str, str] = {}
    for spec in BACKBONES.values():
        for key, param in spec.params.items():
            options.setdefault(key, f"{param.help} [{spec.name}]" if param.help else f"[{spec.name}]")
    return options


# --------------------------------------------------------------------------- extractor


@contextlib.contextmanager
def seeded_initialisation(seed: int) -> Iterator[None]:
    """Make the random initialisation of the layers built inside reproducible.

    Keras gives every initializer created without a seed one drawn from Python's `random`;
    seeding that (and restoring it afterwards, so nothing else's randomness changes) makes
    two builds with one seed the same network.
    """
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


@dataclass
class FeatureExtractor:
    model: keras.Model        # images [0, 255] -> {"pooled": raw features, "embedding": unit vectors}
    #                           (+ "tokens" (batch, T, C) float16, each item scaled to a peak of 1
    #                           (models/heads TokenScale), when built `with_tokens`)
    name: str
    image_size: int
    dim: int
    weights_loaded: str       # what the weights really are: "imagenet", "random", "random (…)", a path
    init_seed: int | None = None  # the seed of the random initialisation, when the weights are random
    text: Any = None          # CLIPTextEmbedder when asked for (`with_text`) and the backbone has a text tower


def _trunk_with_tokens(spec: BackboneSpec, trunk, images):
    """(trunk output, tokens (batch, T, C)) for the preprocessed `images`."""
    import keras

    split = getattr(spec.trunk, "trunk_with_tokens", None)
    if callable(split):
        return split(trunk, images)
    output = trunk(images, training=False)
    if len(output.shape) != 4:
        raise ValueError(f"backbone {spec.name!r} gives no feature map to take tokens from (output {output.shape})")
    height, width, channels = output.shape[1:]
    return output, keras.layers.Reshape((height * width, channels), name="feature_map_tokens")(output)


def build_feature_extractor(name: str, *, weights: str = "imagenet", image_size: int = 0,
                            params: Mapping[str, Any] | None = None, weights_fallback: str = "error",
                            init_seed: int = 0, with_text: bool = False, with_tokens: bool = False,
                            **param_values: Any) -> FeatureExtractor:
    """Build a backbone's extractor. Its options come as `params` or as keywords (`alpha=0.25`).

    `with_text`: also build the text tower of the same weights (`FeatureExtractor.text`), where the
    backbone has one (`BackboneSpec.has_text`); other backbones ignore it.
    `with_tokens`: the model gets a third output, "tokens" (batch, T, C) float16, each item divided by its
    largest absolute value (`TokenScale`; what phase 1 caches and the transformer head reads):
    the builder's `trunk_with_tokens` where it has one (`TokenTrunkBuilder`), else the positions of the
    trunk's last feature map, (H·W, C), row by row.
    """
    import keras

    from models.layers import ImagePreprocess, L2Normalize

    spec = get_spec(name)
    size = image_size or spec.native_size
    request = TrunkRequest(name, (size, size, 3), spec.resolve_params({**param_values, **(params or {})}))

    # Only a random initialisation is seeded: the pretrained and weights-file paths build exactly as
    # before (their draws from Python's `random` still advance it, so whatever is built next — a head,
    # a classifier — starts from the state it always did).
    weights_loaded, seed = "random", init_seed
    if weights == "imagenet":
        try:
            trunk = spec.trunk.pretrained(request)
            weights_loaded, seed = "imagenet", None
        except WeightsUnavailableError as exc:
            if weights_fallback != "random":
                raise
            log.warning("ImageNet weights unavailable for %s, running from a RANDOM initialisation: %s", name, exc)
            weights_loaded = "random (imagenet weights unavailable)"
            with seeded_initialisation(init_seed):
                trunk = spec.trunk.random(request)
    elif weights not in ("none", "", None):
        trunk = spec.trunk.random(request)
        load_weights_file(trunk, weights, name)
        weights_loaded, seed = str(weights), None
    else:
        with seeded_initialisation(init_seed):
            trunk = spec.trunk.random(request)

    images = keras.Input(shape=request.input_shape, name="images")
    x = ImagePreprocess(spec.preprocess, name="preprocess")(images)
    tokens = None
    if with_tokens:
        x, tokens = _trunk_with_tokens(spec, trunk, x)
    else:
        x = trunk(x, training=False)
    if len(x.shape) == 4:
        x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    pooled = keras.layers.Activation("linear", dtype="float32", name="pooled")(x)
    embedding = L2Normalize(name="embedding")(pooled)
    outputs = {"pooled": pooled, "embedding": embedding}
    if tokens is not None:
        from models.heads.transformer_projection import TokenScale

        # Scaled per item and float16: the form they are cached in (a 50 x 768 sequence per image), so a head
        # trained on the cache sees, composed with the backbone at export, exactly the values it trained on.
        outputs["tokens"] = TokenScale(name="tokens")(tokens)
    model = keras.Model(images, outputs, name=f"{name}_extractor")
    text = None
    if with_text and spec.has_text:
        if weights not in ("imagenet", "none", "", None):
            # A weights file holds the trunk (image tower) only; a text tower beside it would be random.
            log.warning("%s: no text embeddings with a weights file (%s): it holds the image tower only", name, weights)
        else:
            text = spec.trunk.text_embedder(trunk)
    return FeatureExtractor(model=model, name=name, image_size=size, dim=int(pooled.shape[-1]),
                            weights_loaded=weights_loaded, init_seed=seed, text=text)
