"""The HTTP API over one exported bundle (FastAPI), its search page at `/`, and `serve` (uvicorn).

    POST /search           multipart `image`, or JSON {"text": ...} / {"vector": [...]}; ?k=&filter=col=value&rerank=
    POST /embed            the same queries -> the unit embedding
    GET  /items/{id}       an item's metadata;   GET /items/{id}/image  its thumbnail, from the bundle
    GET  /health           bundle version, item count, text model or not, image runtime (onnxruntime/savedmodel)
    GET  /metrics          Prometheus text: requests by route and status, latency histogram
    GET  /docs             the OpenAPI schema (/openapi.json) rendered offline
    POST /items, DELETE /items/{id}   only when a bearer token is configured

Query options (k, filter, rerank) are query parameters for every kind of query, so an image
upload and a JSON query take them the same way. Every client mistake is a 4xx `{"error": ...}`
(checks in pipeline.serving.uploads); anything else is a logged 500 with a JSON body. The model
and index are loaded once per worker process and hot-swapped when the bundle's CURRENT changes
(pipeline.serving.live_bundle). No pickle anywhere: bodies are JSON or multipart, the bundle is
Parquet/JSON/FAISS.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.serving import api_schema as schema
from pipeline.serving.http_metrics import HttpMetrics, MetricsMiddleware
from pipeline.serving.live_bundle import LiveBundle
from pipeline.serving.microbatch import MicroBatcher
from pipeline.serving.thumbnails import media_type
from pipeline.serving.uploads import (
    Limits, RequestError, content_type, form_image, only_keys, query_text, query_vector, read_form,
    read_json_object, sniff_image,
)

log = logging.getLogger("embedlab.serve")
PAGE = Path(__file__).resolve().parent / "page"
# Only our own files: no CDN, no inline script, so the page works offline and injected markup cannot run.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
ENV_CONFIG = "EMBEDLAB_SERVE_CONFIG"
# An 8x8 grey RGB PNG.
WARM_UP_IMAGE = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000080000000808020000004b6d29dc00000014494441"
                              "54789c636c686860c00698b08a0e5a09003017019061c797a60000000049454e44ae426082")


@dataclass(frozen=True)
class Batching:
    """Micro-batching of concurrent image embeds. Off by default: measured on 2 shared cores with a 100k flat
    index it lowered throughput at concurrency 8 (52 vs 70 requests/s; bench/bench_serving.py): the search,
    not the model, dominates there, and one model thread serialises what eight threads overlap."""

    enabled: bool = False
    max_batch: int = 16
    max_wait_ms: float = 0.0


@dataclass(frozen=True)
class ServeOptions:
    limits: Limits = field(default_factory=Limits)
    batching: Batching = field(default_factory=Batching)
    reload_check_ms: int = 500          # how often a request may look at the bundle's CURRENT
    # FAISS threads per search. A server parallelises across requests; OpenMP threads spin-waiting for
    # cores that other requests (or other processes) hold made one 100k-item search 5x slower here
    # (BENCHMARKS.md). 0 leaves FAISS's default (all cores).
    faiss_threads: int = 1


def load_searcher(root: Path):
    """The bundle in force under `root` and its Searcher: model and index, loaded once, and warmed up."""
    from pipeline.serving.bundle import open_bundle
    from pipeline.serving.search import Searcher

    searcher = Searcher(open_bundle(root))
    # The first call of a loaded SavedModel builds its graph (a few hundred ms): done here, at start-up or
    # in the background reload, instead of inside the first client's request.
    searcher.embed_images([WARM_UP_IMAGE])
    searcher.search(np.zeros((1, searcher.dim), np.float32) + 1.0, k=1)
    if searcher.has_text:
        searcher.embed_texts(["warm up"])
    return searcher


class ServingState:
    """Everything the routes share in one worker: the live bundle, the batcher, the counters."""

    def __init__(self, bundle_root, token: str | None, options: ServeOptions,
                 loader: Callable[[Path], Any]):
        self.root = Path(bundle_root)
        self.token = token
        self.options = options
        self.limits = options.limits
        self.live = LiveBundle(self.root, loader, options.reload_check_ms / 1000.0)
        self.metrics = HttpMetrics()
        self.write_lock = threading.Lock()
        b = options.batching
        self.batcher = (MicroBatcher(embed_batch, max_batch=b.max_batch, max_wait_ms=b.max_wait_ms)
                        if b.enabled else None)
        self.metrics.add_value("embedlab_bundle_items", "gauge", "Items in the bundle version being served.",
                               lambda: len(self.live.loaded.searcher.bundle.items))
        if self.batcher is not None:
            batcher = self.batcher
            self.metrics.add_value("embedlab_microbatch_model_calls_total", "counter",
                                   "Image model calls made by the micro-batcher.", lambda: batcher.batches)
            self.metrics.add_value("embedlab_microbatch_images_total", "counter",
                                   "Images embedded by those calls (images / calls = the mean batch).",
                                   lambda: batcher.items)

    async def embed_image(self, searcher, data: bytes) -> np.ndarray:
        if self.batcher is not None:
            return await self.batcher.submit(searcher, data)   # raises the item's own error
        result = (await run_in_threadpool(embed_batch, searcher, [data]))[0]
        if isinstance(result, Exception):
            raise result
        return result


def search_or_refuse(searcher, vector: np.ndarray, k: int, filters: dict, rerank: str | None, faiss_threads: int):
    if faiss_threads:
        import faiss

        # OpenMP keeps this setting per calling thread (a thread that never set it uses all cores):
        # so it is set here, in the worker thread that searches. Setting it costs nothing.
        faiss.omp_set_num_threads(faiss_threads)
    try:
        return searcher.search(vector, k=k, filters=filters, rerank=rerank)
    except ValueError as exc:   # the searcher's one-line refusal (e.g. a re-ranker this build lacks)
        raise RequestError(422, f"cannot search: {exc}") from None


def embed_batch(searcher, images: list[bytes]) -> list:
    """One model call for `images`; per image its unit vector or the RequestError saying why not."""
    vectors, errors = searcher.embed_images(images)
    return schema.per_input_results(vectors, errors, len(images))


def create_app(bundle_root: str | os.PathLike, *, token: str | None = None, limits: Limits | None = None,
               options: ServeOptions | None = None, loader: Callable[[Path], Any] = load_searcher) -> FastAPI:
    """The app for one bundle; `token` enables POST/DELETE /items (bearer, compared in constant time)."""
    options = options or ServeOptions()
    if limits is not None:
        options = replace(options, limits=limits)
    if token is not None and not token.strip():
        raise ValueError("the API token is empty; give a real secret or no token (read-only API)")
    state = ServingState(bundle_root, token, options, loader)
    app = FastAPI(title="embedlab search", version="1", docs_url=None, redoc_url=None,
                  description=__doc__.split("\n\n", 1)[0])
    app.state.serving = state
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    add_error_handlers(app)
    add_read_routes(app, state)
    if token is not None:
        add_write_routes(app, state)
    app.mount("/page", StaticFiles(directory=PAGE), name="page")
    app.router.on_shutdown.append(lambda: state.batcher and state.batcher.close())
    return app


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def client_error(request: Request, exc: RequestError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path} (see /docs)"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameters(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": schema.describe_validation(exc.errors())}, status_code=422)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.error("serve: %s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": f"internal server error ({type(exc).__name__}); it was logged"},
                            status_code=500)


def add_read_routes(app: FastAPI, state: ServingState) -> None:
    @app.get("/", include_in_schema=False)
    async def search_page():
        return FileResponse(PAGE / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    @app.get("/docs", include_in_schema=False)
    async def docs_page():
        return FileResponse(PAGE / "docs.html", media_type="text/html", headers=PAGE_HEADERS)

    @app.get("/health", response_model=schema.Health, summary="Bundle version, item count, text model or not")
    async def health():
        loaded = state.live.loaded
        searcher = state.live.current()
        bundle = searcher.bundle
        return JSONResponse({
            "status": "ok", "bundle_version": str(bundle.version), "items": int(len(bundle.items)),
            "has_text": bool(searcher.has_text), "dim": schema.embedding_dim(searcher),
            "backbone": model_name(bundle.card), "loaded_at": loaded.loaded_at,
            "micro_batching": state.batcher is not None, "write_api": state.token is not None,
            "reload_error": state.live.last_error, "image_backend": schema.image_backend(searcher),
        })

    @app.get("/metrics", response_class=Response, summary="Prometheus text format",
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/search", response_model=schema.SearchResponse, openapi_extra=schema.QUERY_BODY,
              responses=schema.ERROR_RESPONSES, summary="Nearest items to an image, a text or a vector")
    async def search(request: Request, params: schema.SearchParameters):
        started = time.perf_counter()
        searcher = state.live.current()
        filters = schema.parse_filters(params["filter"], searcher.bundle.items.columns)
        rerank = schema.rerank_mode(params["rerank"])
        kind, vector = await query_embedding(request, state, searcher)
        hits = await run_in_threadpool(search_or_refuse, searcher, vector, params["k"], filters, rerank,
                                       state.options.faiss_threads)
        return JSONResponse({
            "query": kind, "k": params["k"], "filters": filters, "rerank": params["rerank"],
            "bundle_version": str(searcher.bundle.version),
            "took_ms": round((time.perf_counter() - started) * 1000, 3),
            "results": [schema.hit_json(hit) for hit in hits[0]],
        })

    @app.post("/embed", response_model=schema.EmbedResponse, openapi_extra=schema.QUERY_BODY,
              responses=schema.ERROR_RESPONSES, summary="The unit embedding of an image, a text or a vector")
    async def embed(request: Request):
        searcher = state.live.current()
        kind, vector = await query_embedding(request, state, searcher)
        return JSONResponse({"query": kind, "dim": int(vector.shape[-1]), "bundle_version":
                             str(searcher.bundle.version), "vector": [float(v) for v in vector[0]]})

    # Ids may hold "/" (an ingested item's id is its relative path, "shoes/a.jpg"): `:path` takes them whole,
    # and the /image route comes first so that it is not read as the id "shoes/a.jpg/image".
    @app.get("/items/{item_id:path}/image", response_class=Response, responses={
        **schema.ERROR_RESPONSES, 200: {"content": {"image/jpeg": {}, "image/png": {}}}},
        summary="An item's thumbnail, from the bundle's own copy")
    async def item_image(item_id: str):
        bundle = state.live.current().bundle
        row = schema.find_item(bundle, item_id)
        data = await run_in_threadpool(bundle.thumbnail, row["id"])   # the bundle's own copy
        return Response(data, media_type=media_type(data),
                        headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"})

    @app.get("/items/{item_id:path}", response_model=schema.Item, responses=schema.ERROR_RESPONSES,
             summary="An item's metadata")
    async def item(item_id: str):
        searcher = state.live.current()
        return JSONResponse(schema.item_json(schema.find_item(searcher.bundle, item_id)))



async def query_embedding(request: Request, state: ServingState, searcher) -> tuple[str, np.ndarray]:
    """('image' | 'text' | 'vector', float32 [1, dim] unit vector) from the request body."""
    kind = content_type(request)
    if kind == "multipart/form-data":
        form = await read_form(request, state.limits, max_files=4)   # more than one is refused by name below
        try:
            data = await form_image(form)
        finally:
            await form.close()   # parts over 1 MB were spooled to temporary files
        upload = await run_in_threadpool(sniff_image, data, state.limits)
        vector = await state.embed_image(searcher, upload.data)
        return "image", np.asarray(vector, np.float32).reshape(1, -1)
    if kind == "application/json" or kind.endswith("+json"):
        body = await read_json_object(request, state.limits)
        only_keys(body, ("text", "vector"), " (k, filter and rerank are query parameters)")
        if ("text" in body) == ("vector" in body):
            raise RequestError(400, "send exactly one of 'text' and 'vector'")
        if "vector" in body:
            return "vector", query_vector(body["vector"], schema.embedding_dim(searcher))
        text = query_text(body["text"], state.limits)
        if not searcher.has_text:
            raise RequestError(400, "this bundle has no text model (its backbone is not CLIP): "
                                    "search with an image or a vector")
        vectors = await run_in_threadpool(searcher.embed_texts, [text])
        return "text", np.asarray(vectors, np.float32).reshape(1, -1)
    raise RequestError(415, f"unsupported content type {kind or '(none)'!r}: send multipart/form-data with an "
                            "'image' file, or application/json with 'text' or 'vector'")


def add_write_routes(app: FastAPI, state: ServingState) -> None:
    """POST /items and DELETE /items/{id}: registered only when a token is configured."""
    from pipeline.serving.api_writes import add_items_from_form, remove_item

    expected = state.token.encode("utf-8")

    def require_token(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise StarletteHTTPException(401, "this endpoint needs 'Authorization: Bearer <token>'",
                                         headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), expected):
            raise StarletteHTTPException(403, "wrong token")

    @app.post("/items", status_code=201, dependencies=[Depends(require_token)], openapi_extra=schema.ADD_BODY,
              response_model=schema.WriteResponse, responses={**schema.ERROR_RESPONSES, **schema.AUTH_RESPONSES},
              summary="Add images (embedded with the bundle's own model) as a new bundle version")
    async def add(request: Request):
        form = await read_form(request, state.limits, max_files=state.limits.max_images_per_add)
        try:
            return JSONResponse(await add_items_from_form(state, form), status_code=201)
        finally:
            await form.close()

    @app.delete("/items/{item_id:path}", dependencies=[Depends(require_token)], response_model=schema.WriteResponse,
                responses={**schema.ERROR_RESPONSES, **schema.AUTH_RESPONSES},
                summary="Remove an item as a new bundle version")
    async def remove(item_id: str):
        return JSONResponse(await remove_item(state, item_id))


def model_name(card: dict) -> str:
    """What /health calls the bundle's model: its embeddings tag (e.g. `resnet50-imagenet+triplet`)."""
    tag = (card.get("source") or {}).get("tag")
    if tag:
        return str(tag)
    backbone = card.get("backbone")
    return str(backbone.get("name", "")) if isinstance(backbone, dict) else str(backbone or "")


def read_token_file(path: str | os.PathLike) -> str:
    """The bearer token in `path` (its first line, stripped); a token on the command line would show in `ps`."""
    try:
        lines = Path(path).read_text(encoding="utf-8").strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the token file {path}: {exc}") from None
    token = lines[0].strip() if lines else ""
    if len(token) < 16:
        raise ValueError(f"the token in {path} has {len(token)} characters; use at least 16 "
                         "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))' > token`)")
    return token


def app_from_environment() -> FastAPI:
    """uvicorn's factory for `--workers N`: each worker process builds its app from ENV_CONFIG."""
    config = json.loads(os.environ[ENV_CONFIG])
    options = ServeOptions(limits=Limits(**config["limits"]), batching=Batching(**config["batching"]),
                           reload_check_ms=config["reload_check_ms"], faiss_threads=config["faiss_threads"])
    return create_app(config["bundle_root"], token=config.get("token"), options=options)


def serve(bundle_root: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          token: str | None = None, options: ServeOptions | None = None, access_log: bool = False) -> None:
    """Serve the bundle with uvicorn until interrupted. Loopback only unless `host` says otherwise."""
    import uvicorn

    options = options or ServeOptions()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        app = create_app(bundle_root, token=token, options=options)
        uvicorn.run(app, host=host, port=port, access_log=access_log, log_level="info")
        return
    # Worker processes are spawned fresh: they rebuild the app from the environment (the token
    # travels there too, readable only by this user, like the token file it came from).
    os.environ[ENV_CONFIG] = json.dumps({
        "bundle_root": str(Path(bundle_root).resolve()), "token": token,
        "limits": asdict(options.limits), "batching": asdict(options.batching),
        "reload_check_ms": options.reload_check_ms, "faiss_threads": options.faiss_threads})
    uvicorn.run("pipeline.serving.api:app_from_environment", factory=True, host=host, port=port,
                workers=workers, access_log=access_log, log_level="info")
