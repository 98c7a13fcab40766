"""Write the tiny Hugging Face CLIP checkpoint and its reference outputs in tests/fixtures/hf_clip_tiny/.

Runs once, by hand, in a throw-away environment that has torch and transformers (they are never
dependencies of embedlab; the test that uses the fixture runs without them):

    python3 -m venv /tmp/hfenv
    /tmp/hfenv/bin/pip install torch==2.13.0 transformers safetensors numpy pillow h5py
    /tmp/hfenv/bin/python tools/make_clip_fixture.py [--out tests/fixtures/hf_clip_tiny]

What it writes (all seeded, so a rerun gives the same tensors up to torch's own determinism):
- `config.json`, `model.safetensors`: a random `transformers.CLIPModel`, as `save_pretrained` writes them.
  The architecture is tiny and the two towers have different widths (vision 24, text 8, projection 16),
  so a mapping that swaps the towers or a transpose cannot go unnoticed. Every parameter, LayerNorm
  scales and biases included, gets a random offset, so no tensor is left at a constant initial value
  that a wrong mapping would reproduce by luck.
- `vocab.json`, `merges.txt` (+ `tokenizer.json`, `tokenizer_config.json` as the tokenizer's
  `save_pretrained` writes them): a byte-level BPE vocabulary built here — the 256 byte characters,
  each again with `</w>`, the merges that spell a few clothing words, then `<|startoftext|>` and
  `<|endoftext|>` as the last two ids, which is where OpenAI's vocabulary has them.
- `tf_model.h5`: the same tensors re-keyed into the layout of transformers' `TFCLIPModel.save_pretrained`
  (Keras 2 `save_weights` HDF5: group `clip`, datasets named `tf_clip_model/clip/...:0`, Dense kernels
  (in, out), the patch convolution HWIO, LayerNorm `gamma`/`beta`, `logit_scale` of shape (1,)).
  transformers 5 has no TensorFlow models any more, so this file is *not* written by TFCLIPModel: it
  follows the variable names of transformers 4.x `modeling_tf_clip.py`, the layout the converter reads.
- `reference.npz`: what transformers computes, for the test to compare against:
  `images_uint8` (4, 32, 32, 3), seeded random RGB, and `clip_mean`, `clip_std` (3,) float32. The
  vision tower got `pixel_values` = ((images.astype(float32) / 255.0 - clip_mean) / clip_std) in float32
  numpy, channels first for torch; the test computes the same expression channels last for keras-hub, so
  both see bit-identical inputs (the script checks they equal `CLIPImageProcessor`'s output to 1e-5);
  `image_features`, `image_features_normalized` (4, 16) from `get_image_features`;
  `texts` (5,), `input_ids` (5, 77) from the HF tokenizer padded to 77 with `<|endoftext|>`,
  `input_lengths` (5,) (unpadded length incl. start and end tokens); `text_features`,
  `text_features_normalized` (5, 16) from `get_text_features(input_ids, attention_mask)`.

Text pooling: transformers pools the text tower at the first `eos_token_id` (config `eos_token_id`
49407-style, i.e. not the legacy value 2), keras-hub's `CLIPTextPooler` at `argmax(token_ids)`. They
agree when `<|endoftext|>` has the largest id in the vocabulary, as here and in OpenAI's vocabulary;
the config's `eos_token_id` is set to that id, so the reference uses transformers' current rule.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch
import transformers
from safetensors.numpy import load_file

SEED = 20240611
IMAGE_SIZE = 32
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
START, END = "<|startoftext|>", "<|endoftext|>"
# Words the merges spell out completely; the texts also use words outside them ("zebra", "42", "ünïcode").
MERGED_WORDS = ["a", "photo", "of", "dress", "shirt", "red", "the", "shoe", "laces", "blue", "s"]
TEXTS = [
    "a photo of a dress shirt",
    "A Photo of a RED Dress!",
    "the shoe's laces, size 42.",
    "zebra-striped   blue\tshirt",
    "ünïcode dress",
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_vocabulary() -> tuple[dict[str, int], list[str]]:
    """OpenAI's vocabulary order: bytes, bytes + `</w>`, merge results, then the two special tokens."""
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[str] = []
    for word in MERGED_WORDS:
        symbols = [bytes_to_unicode()[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        merged = symbols[0]
        for nxt in symbols[1:]:
            rule = f"{merged} {nxt}"
            merged = merged + nxt
            if rule not in merges:
                merges.append(rule)
                tokens.append(merged)
    tokens += [START, END]
    assert len(set(tokens)) == len(tokens)
    return {token: i for i, token in enumerate(tokens)}, merges


def clip_config(vocab_size: int, end_id: int, start_id: int) -> transformers.CLIPConfig:
    text = dict(vocab_size=vocab_size, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                bos_token_id=start_id, eos_token_id=end_id, pad_token_id=end_id, projection_dim=16)
    vision = dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                  projection_dim=16)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def tf_layout(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers 4.x TFCLIPModel variable names (without `tf_clip_model/clip/` and `:0`) -> tensors."""
    out = {}
    for name, value in tensors.items():
        if name.endswith("position_ids"):
            continue  # a torch buffer; TFCLIPModel has no such variable
        parts = name.split(".")
        leaf = parts[-1]
        # `encoder.layers.3` -> `encoder/layers_._3` (TF layer names); the rest keeps its names.
        segments = "/".join(parts[:-1]).replace("encoder/layers/", "encoder/layers_._").split("/")
        layer = segments[-1] if segments else ""
        if name == "logit_scale":
            out["logit_scale"] = value.reshape(1)
        elif name.endswith("embeddings.class_embedding"):
            out["/".join(segments + ["class_embedding"])] = value
        elif layer == "token_embedding":
            out["/".join(segments + ["weight"])] = value
        elif layer == "position_embedding":
            out["/".join(segments + ["embeddings"])] = value
        elif layer == "patch_embedding":
            out["/".join(segments + ["kernel"])] = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif "norm" in layer:
            out["/".join(segments + [{"weight": "gamma", "bias": "beta"}[leaf]])] = value
        elif leaf == "weight":  # Linear (out, in) -> Dense kernel (in, out)
            out["/".join(segments + ["kernel"])] = value.T
        elif leaf == "bias":
            out["/".join(segments + ["bias"])] = value
        else:
            raise ValueError(f"no TF name for {name}")
    return out


def write_tf_h5(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Keras 2 `Model.save_weights` HDF5 layout, as `TFCLIPModel.save_pretrained` wrote `tf_model.h5`."""
    names = [f"tf_clip_model/clip/{key}:0" for key in tensors]
    # libver="latest" stores small groups compactly (the file is half the size); h5py reads either format.
    with h5py.File(path, "w", libver="latest") as f:
        f.attrs["layer_names"] = np.array([b"clip"])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.15.0"
        group = f.create_group("clip")
        group.attrs["weight_names"] = np.array([n.encode() for n in names])
        for name, value in zip(names, tensors.values()):
            group.create_dataset(name, data=np.ascontiguousarray(value, dtype=np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/hf_clip_tiny")
    args = parser.parse_args()

    torch.manual_seed(SEED)
    vocab, merges = build_vocabulary()
    config = clip_config(len(vocab), end_id=vocab[END], start_id=vocab[START])
    model = transformers.CLIPModel(config).eval()
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))

    work = Path(tempfile.mkdtemp(prefix="hf_clip_tiny."))
    model.save_pretrained(work, safe_serialization=True)
    (work / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (work / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(work)
    tokenizer.save_pretrained(work)
    assert json.loads((work / "vocab.json").read_text(encoding="utf-8")) == vocab
    tokenizer = transformers.CLIPTokenizer.from_pretrained(work)

    tensors = load_file(work / "model.safetensors")
    write_tf_h5(work / "tf_model.h5", tf_layout(tensors))

    # Images: seeded uint8, already at the model's size, so CLIP's resize and centre crop change nothing
    # and the whole preprocessing is (x / 255 - mean) / std.
    rng = np.random.default_rng(SEED)
    images = rng.integers(0, 256, size=(4, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    pixel_values = ((images.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32)
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                                crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processed = processor(images=list(images), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    gap = float(np.abs(processed - pixel_values).max())
    assert gap < 1e-5, f"CLIPImageProcessor differs from (x/255 - mean)/std by {gap}"

    encoded = tokenizer(TEXTS, padding="max_length", max_length=77, return_tensors="pt")
    lengths = encoded["attention_mask"].sum(dim=1).numpy()
    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=torch.from_numpy(pixel_values.transpose(0, 3, 1, 2)))
        text_features = model.get_text_features(input_ids=encoded["input_ids"],
                                                attention_mask=encoded["attention_mask"])
    # transformers 5 returns a model output here; older versions a tensor.
    image_features = getattr(image_features, "pooler_output", image_features).numpy()
    text_features = getattr(text_features, "pooler_output", text_features).numpy()
    assert image_features.shape == (4, 16) and text_features.shape == (len(TEXTS), 16)
    np.savez_compressed(
             work / "reference.npz",
             images_uint8=images, clip_mean=CLIP_MEAN, clip_std=CLIP_STD,
             image_features=image_features,
             image_features_normalized=image_features / np.linalg.norm(image_features, axis=1, keepdims=True),
             texts=np.array(TEXTS), input_ids=encoded["input_ids"].numpy().astype(np.int32),
             input_lengths=lengths.astype(np.int32),
             text_features=text_features,
             text_features_normalized=text_features / np.linalg.norm(text_features, axis=1, keepdims=True),
             transformers_version=np.array(transformers.__version__), torch_version=np.array(torch.__version__))

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(work), str(args.out))
    total = sum(p.stat().st_size for p in args.out.iterdir())
    for p in sorted(args.out.iterdir()):
        print(f"{p.stat().st_size:>8}  {p.name}")
    print(f"{total:>8}  total in {args.out} (transformers {transformers.__version__}, torch {torch.__version__})")
    for text, ids, n in zip(TEXTS, encoded["input_ids"].numpy(), lengths):
        print(repr(text), ids[:n].tolist())


if __name__ == "__main__":
    main()
