"""CLIP's text tower: strings -> unit vectors in the same space as the image embeddings.

`CLIPTextEmbedder` holds the tokenizer (keras-hub's `CLIPTokenizer`, byte-level BPE, lower-cased)
and a Keras model over token ids (`CLIPBackbone.get_text_embeddings`: the text encoder, the end
token's hidden state, the text projection). Every text is packed to CLIP's 77 positions — start
token, at most 75 text tokens, end token — so longer texts are cut, and `embed` reports how many
were. The text encoder is causal, so what follows the end token (padding) changes nothing.

A random-weights CLIP has no tokenizer files to go with it; it gets `byte_level_tokenizer()`, the
256 byte symbols (each also as a word end) and CLIP's two special tokens, which encodes any text
(one token per byte) and needs nothing from disk. Pretrained CLIPs use their preset's tokenizer.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SEQUENCE_LENGTH = 77
# keras-hub's tokenizer cannot be built with an empty merge list (its lookup table then has no key
# type), so the byte-level vocabulary carries one merge; it changes no id of any single byte.
_BYTE_LEVEL_MERGE = ("t", "h")


def byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map of the 256 byte values to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes)}


def byte_level_vocabulary() -> tuple[dict[str, int], list[str]]:
    """(vocabulary, merges) of the file-free tokenizer: 256 symbols, their word-end forms, one merge, 2 specials."""
    symbols = list(byte_to_unicode().values())
    vocabulary = {symbol: i for i, symbol in enumerate(symbols)}
    vocabulary.update({symbol + "</w>": len(symbols) + i for i, symbol in enumerate(symbols)})
    vocabulary["".join(_BYTE_LEVEL_MERGE)] = len(vocabulary)
    vocabulary["<|startoftext|>"] = len(vocabulary)
    vocabulary["<|endoftext|>"] = len(vocabulary)
    return vocabulary, [" ".join(_BYTE_LEVEL_MERGE)]


BYTE_LEVEL_VOCABULARY_SIZE = len(byte_level_vocabulary()[0])


def byte_level_tokenizer():
    import keras_hub

    vocabulary, merges = byte_level_vocabulary()
    return keras_hub.models.CLIPTokenizer(vocabulary=vocabulary, merges=merges)


def text_model(backbone, name: str):
    """token ids (n, 77) int32 -> {"pooled": projected end-token state, "embedding": its unit vector}."""
    import keras

    from models.layers import L2Normalize

    token_ids = keras.Input(shape=(SEQUENCE_LENGTH,), dtype="int32", name="token_ids")
    projected = backbone.get_text_embeddings(token_ids)
    pooled = keras.layers.Activation("linear", dtype="float32", name="pooled")(projected)
    embedding = L2Normalize(name="embedding")(pooled)
    return keras.Model(token_ids, {"pooled": pooled, "embedding": embedding}, name=f"{name.replace('-', '_')}_text")


@dataclass
class TextEmbeddings:
    pooled: np.ndarray        # (n, d) float32, projected, before normalisation
    embedding: np.ndarray     # (n, d) float32, unit rows
    truncated: np.ndarray     # (n,) bool: the text had more than 75 tokens and was cut


@dataclass
class CLIPTextEmbedder:
    tokenizer: Any            # keras_hub.models.CLIPTokenizer
    model: Any                # keras.Model, see `text_model`
    tokenizer_source: str     # "byte-level" or the preset it came from

    @property
    def dim(self) -> int:
        return int(self.model.outputs[0].shape[-1])

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(token ids (n, 77) int32 — start, text, end, then end tokens as padding; truncated (n,) bool)."""
        import tensorflow as tf

        texts = [str(text) for text in texts]
        if not texts:
            return np.zeros((0, SEQUENCE_LENGTH), np.int32), np.zeros(0, bool)
        pieces = self.tokenizer(texts)
        if isinstance(pieces, tf.RaggedTensor):
            pieces = pieces.to_list()
        pieces = [list(map(int, np.asarray(p).ravel())) for p in pieces]
        room = SEQUENCE_LENGTH - 2
        start, end = int(self.tokenizer.start_token_id), int(self.tokenizer.end_token_id)
        ids = np.full((len(texts), SEQUENCE_LENGTH), end, np.int32)
        truncated = np.zeros(len(texts), bool)
        for row, piece in enumerate(pieces):
            truncated[row] = len(piece) > room
            kept = [start, *piece[:room], end]
            ids[row, :len(kept)] = kept
        return ids, truncated

    def embed(self, texts: Sequence[str], batch_size: int = 256) -> TextEmbeddings:
        pooled, embedding, truncated = [], [], []
        for first in range(0, len(texts), batch_size):
            ids, cut = self.tokenize(texts[first:first + batch_size])
            out = self.model.predict_on_batch(ids)
            pooled.append(np.asarray(out["pooled"], np.float32))
            embedding.append(np.asarray(out["embedding"], np.float32))
            truncated.append(cut)
        if not pooled:
            empty = np.zeros((0, self.dim), np.float32)
            return TextEmbeddings(empty, empty.copy(), np.zeros(0, bool))
        return TextEmbeddings(np.concatenate(pooled), np.concatenate(embedding), np.concatenate(truncated))
