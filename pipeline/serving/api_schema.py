"""What the HTTP API's JSON looks like: response models for the OpenAPI schema, request bodies the
routes parse themselves, query parameters, and the conversions from bundle rows and search hits.

The routes return plain `JSONResponse`s built here (no per-response pydantic validation on the hot
path); the models below document those shapes in /openapi.json, and the schema-driven fuzz test
checks every response against them.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, Query
from pydantic import BaseModel

from pipeline.serving.uploads import RequestError

# pipeline.serving.search's re-rankings: "category" keeps the query's predicted category (a hard mask, the
# seed's), "boost" lifts it; "off" searches by similarity alone.
RerankMode = Literal["off", "category", "boost"]
MAX_K = 100


class ErrorBody(BaseModel):
    error: str


class Hit(BaseModel):
    rank: int
    id: str
    score: float
    label: Any = None
    label_name: str | None = None
    text: str | None = None
    group: str | None = None
    split: str | None = None
    image: str


class SearchResponse(BaseModel):
    query: Literal["image", "text", "vector"]
    k: int
    filters: dict[str, str]
    rerank: RerankMode
    bundle_version: str
    took_ms: float
    results: list[Hit]


class EmbedResponse(BaseModel):
    query: Literal["image", "text", "vector"]
    dim: int
    bundle_version: str
    vector: list[float]


class Item(BaseModel):
    id: str
    label: Any = None
    label_name: str | None = None
    text: str | None = None
    group: str | None = None
    split: str | None = None
    image: str


class Health(BaseModel):
    status: str
    bundle_version: str
    items: int
    has_text: bool
    dim: int
    backbone: str
    loaded_at: float
    micro_batching: bool
    write_api: bool
    reload_error: str | None
    image_backend: str | None = None   # "onnxruntime" | "savedmodel": what embeds query images


class WriteResponse(BaseModel):
    bundle_version: str
    items: int
    added: list[str] = []
    removed: list[str] = []
    rejected: dict[str, str] = {}   # id -> why its image was refused (POST /items)


ERROR_RESPONSES = {status: {"model": ErrorBody, "description": text} for status, text in (
    (400, "a malformed request"), (404, "no such item"), (409, "conflicts with the bundle (POST/DELETE /items)"),
    (413, "over a size or pixel limit"), (415, "not an image / unsupported content type"),
    (422, "invalid parameters or an undecodable image"))}

AUTH_RESPONSES = {401: {"model": ErrorBody, "description": "no bearer token"},
                  403: {"model": ErrorBody, "description": "wrong token"}}

_QUERY_SCHEMAS = {
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["image"],
        "properties": {"image": {"type": "string", "format": "binary",
                                 "description": "JPEG, PNG, GIF, BMP, TIFF or WEBP; type judged from the bytes"}}}},
    "application/json": {"schema": {"oneOf": [
        {"type": "object", "required": ["text"], "additionalProperties": False,
         "properties": {"text": {"type": "string", "description": "needs a bundle with a text model (CLIP)"}}},
        {"type": "object", "required": ["vector"], "additionalProperties": False,
         "properties": {"vector": {"type": "array", "items": {"type": "number"},
                                   "description": "as many numbers as the bundle's embedding dim"}}},
    ]}},
}
QUERY_BODY = {"requestBody": {"required": True, "content": _QUERY_SCHEMAS}}
ADD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image"],
    "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "metadata": {"type": "string", "description": "optional JSON list, one object per image with string "
                                                      "values for id, label_name, text, group, split "
                                                      "(an image without an id is named by its sha256)"}}}}}}}


def search_parameters(
    k: Annotated[int, Query(ge=1, le=MAX_K, description="how many results")] = 10,
    filter: Annotated[list[str], Query(description="column=value, exact match on an item column; repeatable")] = (),
    rerank: Annotated[RerankMode, Query(description="category: only the query's predicted category (label vote "
                                                    "of its nearest items); boost: it first")] = "off",
) -> dict:
    """The query parameters of POST /search (module level: FastAPI resolves these annotations by name)."""
    return {"k": k, "filter": filter, "rerank": rerank}


SearchParameters = Annotated[dict, Depends(search_parameters)]


def parse_filters(values: list[str], columns) -> dict[str, str]:
    filters: dict[str, str] = {}
    for value in values:
        column, sep, wanted = value.partition("=")
        column = column.strip()
        if not sep or not column:
            raise RequestError(400, f"filter {value!r} is not column=value")
        if column not in columns:
            raise RequestError(400, f"unknown filter column {column!r}; item columns: {', '.join(map(str, columns))}")
        if column in filters:
            raise RequestError(400, f"filter column {column!r} given twice")
        filters[column] = wanted
    return filters


def rerank_mode(mode: str) -> str | None:
    return None if mode == "off" else mode


def plain(value):
    """A JSON-ready Python value: numpy scalars unwrapped, NaN/None/pandas NA as None."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)):
        return value
    try:   # pandas.NA and NaT
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return str(value)


def text_or_none(value) -> str | None:
    value = plain(value)
    return None if value is None else str(value)


def image_url(item_id) -> str:
    from urllib.parse import quote

    return f"/items/{quote(str(item_id), safe='')}/image"


def hit_json(hit) -> dict:
    return {"rank": int(hit.rank), "id": str(hit.id), "score": float(plain(hit.score) or 0.0),
            "label": plain(hit.label), "label_name": text_or_none(hit.label_name), "text": text_or_none(hit.text),
            "group": text_or_none(hit.group), "split": text_or_none(hit.split), "image": image_url(hit.id)}


def item_json(row: dict) -> dict:
    # `path` (where the image was on the exporting machine) is left out: it says nothing to a client.
    return {"id": str(row["id"]), "label": plain(row.get("label")), "label_name": text_or_none(row.get("label_name")),
            "text": text_or_none(row.get("text")), "group": text_or_none(row.get("group")),
            "split": text_or_none(row.get("split")), "image": image_url(row["id"])}


ITEM_COLUMNS = ("id", "label", "label_name", "path", "text", "group", "split")   # pipeline.serving.bundle's


def find_item(bundle, item_id: str) -> dict:
    """The item's row (its ITEM_COLUMNS), or 404."""
    row = bundle.position.get(item_id)
    if row is None:
        raise RequestError(404, f"no item with id {item_id!r} in bundle version {bundle.version}")
    items = bundle.items
    return {column: items[column].iat[row] for column in ITEM_COLUMNS if column in items.columns}


def embedding_dim(searcher) -> int:
    return int(searcher.dim)


def image_backend(searcher) -> str | None:
    """The searcher's image runtime; None for a searcher that does not say (the API tests' double)."""
    backend = getattr(searcher, "image_backend", None)
    return None if backend is None else str(backend)


def per_input_results(vectors, errors: dict[int, str], n: int) -> list:
    """Searcher.embed_images's (vectors, {input position: why it was refused}) -> per input, its unit vector
    or the RequestError to answer with. `vectors` has a row per input (refused ones hold no meaning) or a
    row per accepted input."""
    errors = dict(errors or {})
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim != 2 or len(vectors) not in (n, n - len(errors)):
        raise RuntimeError(f"embed_images gave vectors of shape {vectors.shape} for {n} images, {len(errors)} refused")
    compact = len(vectors) != n
    results, row = [], 0
    for i in range(n):
        if i in errors:
            results.append(RequestError(422, f"the image could not be decoded: {errors[i]}"))
            continue
        results.append(vectors[row if compact else i])
        row += 1
    return results


def describe_validation(errors: list[dict]) -> str:
    """FastAPI's validation errors as one line: 'k: Input should be less than or equal to 100'."""
    parts = []
    for error in errors[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "path", "body"))
        parts.append(f"{where or 'request'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"
