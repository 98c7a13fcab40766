"""A stand-in for pipeline.serving.bundle / search with their interface, for the API's fast tests.

The real modules need TensorFlow and an exported model (seconds to load); these tests check what
the HTTP layer does with requests, and the end-to-end tests in test_api.py check the real pair.
The double's embedding is the image's mean colour (decoded by Pillow), so results are predictable.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image


@dataclass
class HitDouble:
    rank: int
    id: str
    score: float
    label: int
    label_name: str
    text: str | None
    group: str | None
    split: str


class BundleDouble:
    def __init__(self, version: str = "v0001", n: int = 12, dim: int = 3, has_text: bool = False):
        rng = np.random.default_rng(0)
        self.version = version
        self.folder = None
        self.card = {"backbone": "double", "embedding_dim": dim}
        self.items = pd.DataFrame({
            "id": [f"item{i:03d}" for i in range(n)], "label": [i % 3 for i in range(n)],
            "label_name": [["red", "green", "blue"][i % 3] for i in range(n)],
            "path": [f"/x/{i}.png" for i in range(n)],
            "text": [f"a {['red', 'green', 'blue'][i % 3]} thing" for i in range(n)], "group": [None] * n,
            "split": ["test"] * n})
        colours = np.eye(3)[self.items["label"].to_numpy()] + rng.normal(0, 0.05, (n, 3))
        self.vectors = (colours / np.linalg.norm(colours, axis=1, keepdims=True)).astype(np.float32)
        self.has_text = has_text

    @property
    def position(self) -> dict[str, int]:
        return {item_id: row for row, item_id in enumerate(self.items["id"])}

    def thumbnail(self, item_id: str) -> bytes:
        colour = tuple(int(255 * c) for c in np.clip(self.vectors[self.position[item_id]], 0, 1))
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), colour).save(buffer, format="PNG")
        return buffer.getvalue()


class SearcherDouble:
    def __init__(self, bundle: BundleDouble):
        self.bundle = bundle
        self.has_text = bundle.has_text
        self.calls: list[int] = []   # batch size of every embed_images call
        self.dim = bundle.vectors.shape[1]

    def embed_images(self, images: list[bytes]):
        self.calls.append(len(images))
        vectors, errors = [], {}
        for i, data in enumerate(images):
            try:
                with Image.open(io.BytesIO(data)) as img:
                    pixels = np.asarray(img.convert("RGB"), np.float32).reshape(-1, 3).mean(axis=0) + 1e-3
            except Exception as exc:  # noqa: BLE001 - the real Searcher reports undecodable images the same way
                errors[i] = f"undecodable ({exc})"
                continue
            vectors.append(pixels / np.linalg.norm(pixels))
        return np.asarray(vectors, np.float32).reshape(-1, 3), errors

    def embed_texts(self, texts: list[str]):
        if not self.has_text:
            raise RuntimeError("no text model")
        names = ["red", "green", "blue"]
        return np.asarray([np.eye(3)[next((i for i, n in enumerate(names) if n in t), 0)] for t in texts], np.float32)

    def search(self, vectors, k=10, filters=None, rerank=None):
        if rerank is not None:
            raise ValueError(f"re-ranking {rerank!r} is not available")
        items = self.bundle.items
        keep = np.ones(len(items), bool)
        for column, value in (filters or {}).items():
            keep &= items[column].astype(str).to_numpy() == value
        results = []
        for query in np.asarray(vectors, np.float32):
            scores = np.where(keep, self.bundle.vectors @ query, -np.inf)
            order = [i for i in np.argsort(-scores, kind="stable")[:k] if np.isfinite(scores[i])]
            results.append([HitDouble(rank + 1, items["id"][i], float(scores[i]), int(items["label"][i]),
                                      items["label_name"][i], items["text"][i], None, items["split"][i])
                            for rank, i in enumerate(order)])
        return results
