"""Search a bundle: images or texts in, ranked items out — the one search path of the CLI and the HTTP API.

`Searcher(bundle)` loads the bundle's models once (image, and text for CLIP bundles) and keeps the
index and items of the version it was given, so it keeps answering from that version while newer ones are
written. Every call takes a batch (the HTTP API micro-batches concurrent requests onto it):
    embed_images(list[bytes]) -> (vectors of the images that could be read, in input order,
                                  {input position: why it could not be read})
                              images run through image_model.onnx under ONNX Runtime when the bundle has it
                              and onnxruntime imports, else the image SavedModel (`image_backend` says which;
                              the decode is TensorFlow's either way, so both give the same vectors to 1e-4)
    embed_texts(list[str])    -> vectors (CLIP bundles; tokenised inside the text SavedModel)
    search(vectors, k, filters, rerank) -> one ranked list of `Hit`s per vector; rerank "category" (or "filter")
                              puts the items of the query's predicted category (the label vote of its 10
                              nearest items) first, "boost" adds 0.1 to their scores (pipeline/vectors/rerank.py)
Scores are inner products of unit vectors (cosine similarity), highest first. `filters` keep the items whose
column equals the value (or one of a list of values), compared as text, so `label=3` and `label_name=shoes`
both work from a command line; the search stays exact over the filtered rows for a flat index (FAISS
searches only the allowed ids).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.serving.bundle import ITEM_COLUMNS, Bundle


# Re-ranking (pipeline/vectors/rerank.py): names callers use -> its mode. "category" is the hard category mask.
RERANK_MODES = {"category": "filter", "filter": "filter", "boost": "boost"}
RERANK_VOTERS = 10        # the query's category = the vote of its nearest this many items' labels
RERANK_POOL = 500         # candidates fetched and re-ordered for each query (at least k)
# Up to this many rows pass the filters, they are scored exactly with numpy (a few ms per query); beyond,
# FAISS searches the index restricted to them (approximate for HNSW / IVF-PQ, like an unfiltered search).
EXACT_FILTERED_ROWS = 50_000


@dataclass(frozen=True)
class Hit:
    rank: int                 # 1 = best
    id: str
    score: float              # cosine similarity
    label: int
    label_name: str
    text: str
    group: str
    split: str

    def to_dict(self) -> dict:
        return asdict(self)


class Searcher:
    def __init__(self, bundle: Bundle):
        from pipeline.serving.serving_model import ImageEmbedder, load_saved_model

        self.bundle = bundle
        self.images = ImageEmbedder(bundle.image_model_dir, onnx_file=bundle.image_onnx)
        self.text_model = load_saved_model(bundle.text_model_dir, text=True) if bundle.has_text else None
        items = bundle.items
        # Column arrays, read per hit without pandas' per-row cost.
        self.columns = {c: items[c].to_numpy() for c in ITEM_COLUMNS}
        self.as_text: dict[str, np.ndarray] = {}

    @property
    def has_text(self) -> bool:
        return self.text_model is not None

    @property
    def image_backend(self) -> str:
        """"onnxruntime" or "savedmodel": what embeds query images."""
        return self.images.backend

    @property
    def dim(self) -> int:
        return int(self.bundle.embeddings.shape[1])

    def embed_images(self, images: Sequence[bytes]) -> tuple[np.ndarray, dict[int, str]]:
        vectors, errors, _ = self.images.embed(list(images))
        keep = [p for p in range(len(images)) if p not in errors]
        return vectors[keep], errors

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        import tensorflow as tf

        if self.text_model is None:
            raise ValueError(f"bundle {self.bundle.root} has no text model (its backbone embeds no text)")
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return self.text_model.embed_texts(tf.constant([str(t) for t in texts]))["embedding"].numpy()

    def allowed_rows(self, filters: dict | None) -> np.ndarray | None:
        """Rows whose columns match every filter; None when nothing is filtered."""
        if not filters:
            return None
        mask = np.ones(len(self.bundle.items), dtype=bool)
        for column, wanted in filters.items():
            if column not in self.columns:
                raise ValueError(f"unknown filter column {column!r}; item columns: {', '.join(ITEM_COLUMNS)}")
            if column not in self.as_text:
                self.as_text[column] = self.bundle.items[column].astype(str).to_numpy()
            values = wanted if isinstance(wanted, (list, tuple, set)) else [wanted]
            mask &= np.isin(self.as_text[column], [str(v) for v in values])
        return np.flatnonzero(mask)

    def search(self, vectors, k: int = 10, filters: dict | None = None, rerank: str | None = None) -> list[list[Hit]]:
        from pipeline.vectors.normalize import l2_normalize

        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if rerank is not None and rerank not in RERANK_MODES:
            raise ValueError(f"unknown re-ranking {rerank!r}; expected one of {', '.join(RERANK_MODES)}")
        queries = np.asarray(vectors, dtype=np.float32)
        queries = queries[None, :] if queries.ndim == 1 else queries
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query vectors must be (n, {self.dim}), got {tuple(np.shape(vectors))}")
        if len(queries) == 0:
            return []
        queries = l2_normalize(queries)
        allowed = self.allowed_rows(filters)
        if allowed is not None and len(allowed) == 0:
            return [[] for _ in queries]
        scores, rows = self.nearest(queries, max(k, RERANK_POOL) if rerank else k, allowed)
        if rerank:
            from pipeline.vectors.rerank import predict_category, rerank as reorder

            labels = self.columns["label"][np.where(rows >= 0, rows, 0)]
            voters = slice(0, RERANK_VOTERS)
            category = predict_category(labels[:, voters], valid=(rows >= 0)[:, voters])
            rows, scores = reorder(rows, scores, labels, category, mode=RERANK_MODES[rerank], k=k)
        return [self.hits(score_row, row_row) for score_row, row_row in zip(scores, rows)]

    def nearest(self, queries: np.ndarray, k: int, allowed: np.ndarray | None):
        """(scores, rows) of the best k items (of `allowed` rows, when given) for each unit query."""
        index = self.bundle.index
        if allowed is None:
            return index.search(queries, min(k, index.ntotal))
        if len(allowed) <= EXACT_FILTERED_ROWS:
            return exact_top_k(queries, self.bundle.embeddings, allowed, k)
        return index.search(queries, min(k, len(allowed)), params=selector_parameters(index, allowed))

    def hits(self, scores: np.ndarray, rows: np.ndarray) -> list[Hit]:
        c = self.columns
        out = []
        for score, row in zip(scores, rows):
            if row < 0:   # FAISS pads with -1 when fewer than k items qualify
                continue
            out.append(Hit(rank=len(out) + 1, id=str(c["id"][row]), score=float(score), label=int(c["label"][row]),
                           label_name=str(c["label_name"][row]), text=str(c["text"][row]),
                           group=str(c["group"][row]), split=str(c["split"][row])))
        return out


def exact_top_k(queries: np.ndarray, embeddings: np.ndarray, rows: np.ndarray, k: int):
    """(scores, rows) of the best k of `rows` for each unit query, by exact inner product, best first."""
    scores = queries @ embeddings[rows].T
    k = min(k, len(rows))
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    return np.take_along_axis(top_scores, order, axis=1), rows[np.take_along_axis(top, order, axis=1)]


def selector_parameters(index, rows: np.ndarray):
    """FAISS search parameters that restrict `index` to `rows`, keeping its own search-time settings."""
    import faiss

    selector = faiss.IDSelectorBatch(rows.astype(np.int64))
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)
    if isinstance(inner, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=selector, nprobe=inner.nprobe)
    return faiss.SearchParameters(sel=selector)
