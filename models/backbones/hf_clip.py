"""Hugging Face CLIP folders (`CLIPModel.save_pretrained`) -> keras-hub CLIP preset folders, without torch.

Weights come from `model.safetensors` (or its sharded index) via safetensors' numpy API, or from `tf_model.h5`
via h5py (transformers 4.x `TFCLIPModel` layout); `pytorch_model.bin` is a pickle: refused, never unpickled.
Every source tensor must be used once and every keras-hub variable set, or the conversion fails listing the
names. The preset is written to a temporary sibling folder and renamed into place, so one that exists is
complete; `keras_hub_preset_for` converts once into a cache and re-uses it. keras-hub is imported lazily.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TF_H5 = "tf_model.h5"
PICKLE = "pytorch_model.bin"
FLAX = "flax_model.msgpack"
START, END = "<|startoftext|>", "<|endoftext|>"
# torch buffers older transformers saved; keras-hub's vision position_ids are set to arange instead.
KNOWN_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
# Changing the mapping or the saved files changes this, so cached conversions are redone.
CONVERTER_VERSION = 1
COMPLETE_MARKER = "conversion.json"
# HF hidden_act -> keras-hub `intermediate_activation`: keras-hub's "quick_gelu" is x*sigmoid(1.702x); other
# strings go to keras.activations, whose "gelu" is the exact erf form like HF's. HF's tanh forms are refused.
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}
# keras-hub hard-codes LayerNorm epsilons: 1e-5 in the encoder blocks and vision pre/post norms, 1e-6 in the
# text tower's final norm; HF uses config.layer_norm_eps (1e-5 in published CLIPs). Up to 1e-5 the change is
# ~eps/(2 var) relative (measured 6e-6 on the fixture's text features); larger ones are refused.
MAX_LAYER_NORM_EPS = 1e-5


# mkdtemp's folder is owner-only; the preset gets the usual permissions under the user's umask.
_UMASK = os.umask(0)
os.umask(_UMASK)
log = logging.getLogger(__name__)


class HFCLIPError(ValueError):
    """A Hugging Face CLIP folder that cannot be converted (the message is one line)."""


@dataclass(frozen=True)
class CLIPArchitecture:
    """What keras-hub's CLIP needs from an HF config.json: the two encoders' keyword arguments and the rest."""

    vision: dict  # CLIPVisionEncoder(**vision)
    text: dict  # CLIPTextEncoder(**text)
    projection_dim: int
    eos_token_id: int | None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path.name} not found in {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HFCLIPError(f"{path} is not valid JSON ({exc})") from None


def _config_of(path: str | Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads((Path(path).expanduser() / CONFIG).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    return {}


def _optional_json(path: Path) -> dict:
    return _read_json(path) if path.is_file() else {}


def is_keras_hub_preset(path: str | Path) -> bool:
    """config.json written by keras-hub's `save_to_preset` (a serialised Keras object)."""
    data = _config_of(path)
    return "registered_name" in data or {"module", "class_name"} <= data.keys()


def is_hf_clip_folder(path: str | Path) -> bool:
    """config.json says model_type "clip" (or architectures holds CLIPModel) and is not a keras-hub preset."""
    data = _config_of(path)
    return not is_keras_hub_preset(path) and (data.get("model_type") == "clip"
                                              or "CLIPModel" in (data.get("architectures") or []))


def read_architecture(config: Mapping) -> CLIPArchitecture:
    """Check an HF CLIP config against what keras-hub's CLIP can express and read its hyper-parameters."""
    text, vision = config.get("text_config") or {}, config.get("vision_config") or {}
    for tower, cfg in (("vision", vision), ("text", text)):
        act = cfg.get("hidden_act", "quick_gelu")
        if act not in ACTIVATIONS:
            raise HFCLIPError(f"{tower}_config.hidden_act {act!r} is not supported: keras-hub's CLIP encoder takes "
                              f"{', '.join(sorted(ACTIVATIONS))}")
        eps = float(cfg.get("layer_norm_eps", 1e-5))
        if eps > MAX_LAYER_NORM_EPS:
            raise HFCLIPError(f"{tower}_config.layer_norm_eps {eps:g} differs from keras-hub's hard-coded 1e-5/1e-6 "
                              f"by more than the conversion tolerates")
    if int(vision.get("num_channels", 3)) != 3:
        raise HFCLIPError(f"vision_config.num_channels is {vision.get('num_channels')}; keras-hub's CLIP takes RGB")

    def hyper(cfg: Mapping, key: str, default: int) -> int:
        try:
            return int(cfg.get(key, default))
        except (TypeError, ValueError):
            raise HFCLIPError(f"config.json: {key} is {cfg.get(key)!r}, not an integer") from None

    size = hyper(vision, "image_size", 224)
    return CLIPArchitecture(
        vision={"patch_size": hyper(vision, "patch_size", 32), "hidden_dim": hyper(vision, "hidden_size", 768),
                "num_layers": hyper(vision, "num_hidden_layers", 12),
                "num_heads": hyper(vision, "num_attention_heads", 12),
                "intermediate_dim": hyper(vision, "intermediate_size", 3072),
                "intermediate_activation": ACTIVATIONS[vision.get("hidden_act", "quick_gelu")],
                "image_shape": (size, size, 3)},
        text={"vocabulary_size": hyper(text, "vocab_size", 49408), "embedding_dim": hyper(text, "hidden_size", 512),
              "hidden_dim": hyper(text, "hidden_size", 512), "num_layers": hyper(text, "num_hidden_layers", 12),
              "num_heads": hyper(text, "num_attention_heads", 8),
              "intermediate_dim": hyper(text, "intermediate_size", 2048),
              "intermediate_activation": ACTIVATIONS[text.get("hidden_act", "quick_gelu")],
              "max_sequence_length": hyper(text, "max_position_embeddings", 77)},
        projection_dim=hyper(config, "projection_dim", 512),
        eos_token_id=None if text.get("eos_token_id") is None else hyper(text, "eos_token_id", 0))


def _weight_format(source: Path) -> str:
    for name in (SAFETENSORS, SAFETENSORS_INDEX, TF_H5):
        if (source / name).is_file():
            return name
    if (source / PICKLE).is_file():
        raise HFCLIPError(f"{source} holds only {PICKLE}, a pickle embedlab will not load; convert it to safetensors "
                          f"in a Python with torch and transformers: CLIPModel.from_pretrained(dir)"
                          f".save_pretrained(dir, safe_serialization=True)")
    flax = f" (it has {FLAX}: save it as safetensors with transformers first)" if (source / FLAX).is_file() else ""
    raise FileNotFoundError(f"{SAFETENSORS} (or {SAFETENSORS_INDEX} or {TF_H5}) not found in {source}{flax}")


def _shard_map(source: Path) -> dict[str, str]:
    return _read_json(source / SAFETENSORS_INDEX).get("weight_map") or {}


def _read_safetensors(source: Path, fmt: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    tensors: dict[str, np.ndarray] = {}
    for name in [fmt] if fmt == SAFETENSORS else sorted(set(_shard_map(source).values())):
        if not (source / name).is_file():
            raise FileNotFoundError(f"{name} (listed in {SAFETENSORS_INDEX}) not found in {source}")
        try:
            shard = load_file(source / name)
        except Exception as exc:  # noqa: BLE001  (safetensors raises its own types; all mean "unreadable")
            raise HFCLIPError(f"cannot read {source / name} ({type(exc).__name__}: {exc})") from None
        if set(shard) & set(tensors):
            raise HFCLIPError(f"tensors {sorted(set(shard) & set(tensors))} appear in two shards in {source}")
        tensors.update(shard)
    if fmt == SAFETENSORS_INDEX:
        listed = set(_shard_map(source))
        if listed != set(tensors):
            raise HFCLIPError(f"{SAFETENSORS_INDEX} and its shards disagree: listed only "
                              f"{sorted(listed - set(tensors))}, stored only {sorted(set(tensors) - listed)}")
    return tensors


# The top-level names of transformers' TFCLIPMainLayer; a TF variable name is read from the first of them
# (the h5 stores it as e.g. `clip/tf_clip_model/clip/text_model/.../q_proj/kernel:0`).
_TF_ROOTS = ("text_model", "vision_model", "visual_projection", "text_projection", "logit_scale")


def tf_name_to_hf(tf_name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """One TFCLIPModel variable -> the CLIPModel (torch) name and layout of the same tensor."""
    parts = tf_name.split(":")[0].split("/")
    roots = [i for i, part in enumerate(parts) if part in _TF_ROOTS]
    parts = parts[roots[0]:] if roots else parts
    parts = [part.replace("layers_._", "layers.") for part in parts]
    *layer, leaf = parts
    owner = layer[-1] if layer else ""
    if parts == ["logit_scale"]:
        return "logit_scale", value.reshape(())
    if leaf == "kernel" and owner == "patch_embedding":
        return ".".join(layer + ["weight"]), value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if leaf == "kernel":
        return ".".join(layer + ["weight"]), value.T  # Dense (in, out) -> Linear (out, in)
    if owner == "position_embedding" and leaf == "embeddings":
        return ".".join(layer + ["weight"]), value
    leaf = {"gamma": "weight", "beta": "bias"}.get(leaf, leaf)
    return ".".join(layer + [leaf]), value


def _read_tf_h5(path: Path) -> dict[str, np.ndarray]:
    import h5py

    tensors, datasets = {}, []
    try:
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: datasets.append((name, obj[()])) if isinstance(obj, h5py.Dataset) else None)
    except OSError as exc:
        raise HFCLIPError(f"cannot read {path} as HDF5 ({exc})") from None
    for tf_name, value in datasets:
        name, value = tf_name_to_hf(tf_name, np.asarray(value))
        if name in tensors:
            raise HFCLIPError(f"{path} holds {name} twice (second as {tf_name})")
        tensors[name] = value
    return tensors


def read_tokenizer_files(source: Path) -> tuple[dict[str, int], list[str]]:
    """vocab.json + merges.txt, or the BPE model inside tokenizer.json."""
    if (source / "vocab.json").is_file() or not (source / "tokenizer.json").is_file():
        vocab = _read_json(source / "vocab.json")
        if not (source / "merges.txt").is_file():
            raise FileNotFoundError(f"merges.txt not found in {source}")
        lines = (source / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [line for line in lines if line.strip() and not line.startswith("#version")]
        return vocab, merges
    model = _read_json(source / "tokenizer.json").get("model") or {}
    if model.get("type") != "BPE":
        raise HFCLIPError(f"{source / 'tokenizer.json'} holds a {model.get('type')} model, not CLIP's BPE")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return dict(model.get("vocab", {})), merges


def _check_vocabulary(vocab: Mapping[str, int], arch: CLIPArchitecture) -> None:
    missing = [token for token in (START, END) if token not in vocab]
    if missing:
        raise HFCLIPError(f"the vocabulary lacks CLIP's special tokens {missing}")
    if max(vocab.values()) >= arch.text["vocabulary_size"]:
        raise HFCLIPError(f"the vocabulary has ids up to {max(vocab.values())} but the text embedding has "
                          f"{arch.text['vocabulary_size']} rows")
    # keras-hub's CLIPTextPooler pools at argmax(token_ids), transformers at the first eos_token_id (or at
    # the argmax when eos_token_id is the legacy 2): the same position only if <|endoftext|> has the largest id.
    if vocab[END] != max(vocab.values()):
        raise HFCLIPError(f"{END} has id {vocab[END]}, not the largest ({max(vocab.values())}); keras-hub's text "
                          f"pooler (argmax of the ids) would pool at the wrong token")
    if arch.eos_token_id not in (None, 2, vocab[END]):
        raise HFCLIPError(f"text_config.eos_token_id is {arch.eos_token_id} but {END} is {vocab[END]}")


def _block_mapping(hf: str, kh: str, hidden: int, heads: int) -> dict[str, tuple[str, object]]:
    """keras-hub CLIPEncoderLayer variable -> (HF tensor, transform)."""
    head_dim = hidden // heads  # Linear (out, in) -> EinsumDense (in, heads, head_dim) and (heads, head_dim, out)
    mapping = {f"{kh}/attention/attention_output/kernel": (f"{hf}.self_attn.out_proj.weight",
                                                           lambda w: w.T.reshape(heads, head_dim, hidden)),
               f"{kh}/attention/attention_output/bias": (f"{hf}.self_attn.out_proj.bias", None)}
    for k, h in (("query", "q"), ("key", "k"), ("value", "v")):
        mapping[f"{kh}/attention/{k}/kernel"] = (f"{hf}.self_attn.{h}_proj.weight",
                                                 lambda w: w.T.reshape(hidden, heads, head_dim))
        mapping[f"{kh}/attention/{k}/bias"] = (f"{hf}.self_attn.{h}_proj.bias", lambda b: b.reshape(heads, head_dim))
    for k, h in (("dense_1", "mlp.fc1"), ("dense_2", "mlp.fc2")):
        mapping[f"{kh}/{k}/kernel"] = (f"{hf}.{h}.weight", np.transpose)
        mapping[f"{kh}/{k}/bias"] = (f"{hf}.{h}.bias", None)
    return mapping | _layer_norms(hf, kh, {"layer_norm_1": "layer_norm1", "layer_norm_2": "layer_norm2"})


def _layer_norms(hf: str, kh: str, names: Mapping[str, str]) -> dict[str, tuple[str, None]]:
    """keras-hub LayerNormalization gamma/beta -> HF LayerNorm weight/bias, for {keras-hub name: HF name}."""
    return {f"{kh}/{k}/{g}": (f"{hf}.{h}.{w}", None) for k, h in names.items()
            for g, w in (("gamma", "weight"), ("beta", "bias"))}


def weight_mapping(arch: CLIPArchitecture) -> dict[str, tuple[str, object]]:
    """keras-hub variable key -> (HF tensor, transform); keys prefix a tower's variable paths with the tower."""
    v, t = "vision_encoder", "text_encoder"
    mapping = {
        f"{v}/embedding/patch_embedding/kernel": ("vision_model.embeddings.patch_embedding.weight",
                                                  lambda w: w.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
        f"{v}/embedding/class_embedding": ("vision_model.embeddings.class_embedding", None),
        f"{v}/embedding/position_embedding/embeddings": ("vision_model.embeddings.position_embedding.weight", None),
        f"{t}/embedding/token_embedding/embeddings": ("text_model.embeddings.token_embedding.weight", None),
        f"{t}/embedding/position_embedding/embeddings": ("text_model.embeddings.position_embedding.weight", None),
        "vision_projection/kernel": ("visual_projection.weight", np.transpose),
        "text_projection/kernel": ("text_projection.weight", np.transpose),
        "clip_head/logit_scale": ("logit_scale", lambda s: np.reshape(s, ())),
    }
    mapping |= _layer_norms("vision_model", v, {"pre_layer_norm": "pre_layrnorm", "layer_norm": "post_layernorm"})
    mapping |= _layer_norms("text_model", t, {"layer_norm": "final_layer_norm"})
    for hf, kh, tower in (("vision_model", v, arch.vision), ("text_model", t, arch.text)):
        for i in range(tower["num_layers"]):
            mapping.update(_block_mapping(f"{hf}.encoder.layers.{i}", f"{kh}/encoder_block_{i}",
                                          tower["hidden_dim"], tower["num_heads"]))
    return mapping


def build_backbone(arch: CLIPArchitecture):
    """A keras-hub CLIPBackbone with the checkpoint's hyper-parameters (random weights, float32)."""
    import keras_hub

    vision = keras_hub.models.CLIPVisionEncoder(**arch.vision, dtype="float32")
    text = keras_hub.models.CLIPTextEncoder(**arch.text, dtype="float32")
    return keras_hub.models.CLIPBackbone(vision, text, arch.projection_dim, dtype="float32")


def backbone_variables(backbone) -> dict[str, object]:
    """Every variable of a CLIPBackbone under the keys `weight_mapping` uses."""
    out = {f"{tower}/{var.path}": var for tower in ("vision_encoder", "text_encoder")
           for var in getattr(backbone, tower).weights}
    inside = {id(var) for var in out.values()}
    return out | {var.path: var for var in backbone.weights if id(var) not in inside}


def load_hf_weights(backbone, arch: CLIPArchitecture, tensors: Mapping[str, np.ndarray]) -> None:
    """Set every backbone variable from the HF tensors; fail listing unused, missing or misshapen names."""
    targets = backbone_variables(backbone)
    mapping = weight_mapping(arch)
    derived = {"vision_encoder/embedding/position_ids"}  # arange, which keras-hub initialises to zeros
    unmapped, unknown = sorted(set(targets) - set(mapping) - derived), sorted(set(mapping) - set(targets))
    if unmapped or unknown:
        raise HFCLIPError(f"embedlab's CLIP mapping misfits this keras-hub: unmapped {unmapped}, unknown {unknown}")
    used = {source for source, _ in mapping.values()}
    missing, unused = sorted(used - set(tensors)), sorted(set(tensors) - used - set(KNOWN_BUFFERS))
    if missing or unused:
        raise HFCLIPError(f"checkpoint and config disagree: missing tensors {missing}, unused tensors {unused}")
    values = {key: (transform or np.asarray)(np.asarray(tensors[source], dtype=np.float32))
              for key, (source, transform) in mapping.items()}
    wrong = [f"{source} {tuple(tensors[source].shape)} -> {key} {tuple(targets[key].shape)}"
             for key, (source, _) in mapping.items() if tuple(values[key].shape) != tuple(targets[key].shape)]
    if wrong:
        raise HFCLIPError(f"tensor shapes do not match the config: {'; '.join(wrong)}")
    for key, value in values.items():
        targets[key].assign(value)
    position_ids = targets["vision_encoder/embedding/position_ids"]
    position_ids.assign(np.arange(position_ids.shape[-1]).reshape(position_ids.shape))


def _source_files(source: Path) -> list[Path]:
    names = [CONFIG, "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
             SAFETENSORS, SAFETENSORS_INDEX, TF_H5]
    if (source / SAFETENSORS_INDEX).is_file() and not (source / SAFETENSORS).is_file():
        names += sorted(set(_shard_map(source).values()))
    return [source / name for name in names if (source / name).is_file()]


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (COMPLETE_MARKER, CONFIG, "model.weights.h5", "tokenizer.json"))


def convert_hf_clip(source_dir: str | Path, dest_dir: str | Path) -> Path:
    """Convert an HF CLIP folder into a keras-hub preset folder `dest_dir` (which must not exist, or be empty)."""
    import keras_hub

    source, dest = Path(source_dir).expanduser().resolve(), Path(dest_dir).expanduser().resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is not a folder")
    config = _read_json(source / CONFIG)
    if not is_hf_clip_folder(source):
        raise HFCLIPError(f"{source}/{CONFIG} is no CLIP config (model_type {config.get('model_type')!r})")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest} already exists and is not empty; remove it or choose another destination")
    arch = read_architecture(config)
    vocab, merges = read_tokenizer_files(source)
    _check_vocabulary(vocab, arch)
    fmt = _weight_format(source)  # tensors in CLIPModel's (torch) names and layouts, whatever the file
    tensors = _read_tf_h5(source / fmt) if fmt == TF_H5 else _read_safetensors(source, fmt)

    backbone = build_backbone(arch)
    load_hf_weights(backbone, arch, tensors)
    pad_token = _optional_json(source / "tokenizer_config.json").get("pad_token", END)  # HF CLIP's default
    tokenizer = keras_hub.models.CLIPTokenizer(vocabulary=dict(vocab), merges=list(merges),
                                               pad_with_end_token=pad_token == END)
    preprocessor = keras_hub.models.CLIPPreprocessor(tokenizer, sequence_length=arch.text["max_sequence_length"])
    image_processing = _optional_json(source / "preprocessor_config.json")

    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        os.chmod(work, 0o777 & ~_UMASK)  # mkdtemp makes it owner-only
        backbone.save_to_preset(str(work))
        preprocessor.save_to_preset(str(work))  # writes the tokenizer too
        record = {"converter_version": CONVERTER_VERSION, "source": str(source), "weights": fmt,
                  "source_files": {p.name: p.stat().st_size for p in _source_files(source)},
                  "keras_hub_version": keras_hub.__version__, "architecture": asdict(arch),
                  "image_mean": image_processing.get("image_mean"), "image_std": image_processing.get("image_std")}
        (work / COMPLETE_MARKER).write_text(json.dumps(record, indent=2), encoding="utf-8")
        if dest.is_dir():
            dest.rmdir()  # empty (checked above); os.replace cannot rename onto a folder that has entries
        os.replace(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("converted HF CLIP %s (%s) into keras-hub preset %s", source, fmt, dest)
    return dest


def default_cache_dir() -> Path:
    return Path(os.environ.get("EMBEDLAB_CACHE", "~/.cache/embedlab")).expanduser()


def source_fingerprint(source: str | Path) -> str:
    """A hash of the converter version, config.json's text and the names, sizes and mtimes of the files read.

    Stat data, not a content hash: free on every run, where hashing a 1.7 GB ViT-L checkpoint takes seconds.
    Rewriting a file changes its mtime; a copy that resets mtimes only costs one more conversion.
    """
    source = Path(source).expanduser().resolve()
    digest = hashlib.sha256(f"embedlab-hf-clip-{CONVERTER_VERSION}".encode())
    for path in _source_files(source):
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    digest.update((source / CONFIG).read_bytes())
    return digest.hexdigest()[:16]


def keras_hub_preset_for(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A keras-hub preset folder for `path`: itself if it is one, else its cached conversion (made once)."""
    folder = Path(path).expanduser()
    if is_keras_hub_preset(folder):
        return folder
    if not is_hf_clip_folder(folder):
        raise ValueError(f"{folder} is neither a keras-hub preset folder nor a Hugging Face CLIP folder "
                         f"(config.json with model_type 'clip')")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dest = cache / "clip-converted" / f"{folder.resolve().name}-{source_fingerprint(folder)}"
    if _is_complete(dest):
        return dest
    try:
        return convert_hf_clip(folder, dest)
    except OSError:
        if _is_complete(dest):  # another process finished the same conversion first
            return dest
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.backbones.hf_clip",
                                     description="Convert a Hugging Face CLIP folder into a keras-hub preset folder.")
    parser.add_argument("source", type=Path, help="folder with config.json, weights, vocab.json and merges.txt")
    parser.add_argument("dest", type=Path, help="new keras-hub preset folder (must not exist or be empty)")
    args = parser.parse_args(argv)
    try:
        print(convert_hf_clip(args.source, args.dest))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
