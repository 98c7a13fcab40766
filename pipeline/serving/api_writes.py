"""POST /items and DELETE /items/{id}: bundle writes over HTTP (registered only when a token is set).

Each write goes through pipeline.serving.bundle, which writes a new version beside the old one
and swaps CURRENT atomically; this worker then loads the new version before answering, so the
client's next request sees its change, while requests already running finish on the old one.
Writes from one worker are serialised by a lock; other workers pick the new version up at their
next CURRENT check.
"""
from __future__ import annotations

import hashlib
import json

from fastapi.concurrency import run_in_threadpool

from pipeline.serving.uploads import RequestError, sniff_image

# Item columns a client may set for an added image (the bundle numbers labels from label_name itself;
# `path` would name a file on the client's machine). Without an id, an image is named by its content.
CLIENT_COLUMNS = ("id", "label_name", "text", "group", "split")


async def add_items_from_form(state, form) -> dict:
    files = form.getlist("image")
    if not files or any(isinstance(f, str) for f in files):
        sent = ", ".join(sorted(map(repr, form.keys()))) or "none"
        raise RequestError(400, f"send one or more 'image' files (fields sent: {sent})")
    uploads = [sniff_image(await f.read(), state.limits) for f in files]
    images = [upload.data for upload in uploads]
    metadata = parse_metadata(form.get("metadata"), len(uploads))
    for row, data in zip(metadata, images):
        row["id"] = str(row.get("id") or "img-" + hashlib.sha256(data).hexdigest()[:16])
    return await run_in_threadpool(write_added, state, images, metadata)


def parse_metadata(raw, n: int) -> list[dict]:
    if raw is None:
        return [{} for _ in range(n)]
    if not isinstance(raw, str):
        raise RequestError(400, "'metadata' must be a text field holding a JSON list")
    try:
        rows = json.loads(raw, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    except (ValueError, RecursionError):
        raise RequestError(400, "'metadata' is not valid JSON") from None
    if not isinstance(rows, list) or len(rows) != n or not all(isinstance(r, dict) for r in rows):
        raise RequestError(400, f"'metadata' must be a JSON list of {n} object(s), one per image")
    for row in rows:
        unknown = sorted(set(row) - set(CLIENT_COLUMNS))
        if unknown:
            raise RequestError(400, f"'metadata' sets unknown column(s) {unknown}; "
                                    f"allowed: {', '.join(CLIENT_COLUMNS)}")
        bad = [key for key, value in row.items() if value is not None and not isinstance(value, str)]
        if bad:
            raise RequestError(400, f"'metadata' values must be strings (column(s) {bad})")
        if len(row.get("id") or "") > 200:
            raise RequestError(400, "an item id must have at most 200 characters")
    return rows


def write_added(state, images: list[bytes], metadata: list[dict]) -> dict:
    from pipeline.core.errors import BundleError
    from pipeline.serving.bundle import add_items

    ids = [row["id"] for row in metadata]
    with state.write_lock:
        held = state.live.current().bundle.position
        taken = sorted({i for i in ids if i in held or ids.count(i) > 1})
        if taken:
            raise RequestError(409, f"id(s) already in the bundle or sent twice: {', '.join(map(repr, taken[:5]))}")
        rejected: dict[str, str] = {}
        try:
            added = add_items(state.root, images, metadata, rejected=rejected)
        except BundleError as exc:   # the bundle's one-line refusal: no image its model could read, ...
            raise RequestError(422, str(exc)) from None
        loaded = state.live.reload_now()
    bundle = loaded.searcher.bundle
    return {"bundle_version": str(bundle.version), "items": int(len(bundle.items)),
            "added": [str(i) for i in added], "removed": [], "rejected": rejected}


async def remove_item(state, item_id: str) -> dict:
    return await run_in_threadpool(write_removed, state, item_id)


def write_removed(state, item_id: str) -> dict:
    from pipeline.serving.api_schema import find_item
    from pipeline.core.errors import BundleError
    from pipeline.serving.bundle import remove_items

    with state.write_lock:
        row = find_item(state.live.current().bundle, item_id)   # 404 for an unknown id
        try:
            remove_items(state.root, [row["id"]])
        except BundleError as exc:   # e.g. it is the last item: a bundle is never empty
            raise RequestError(409, str(exc)) from None
        loaded = state.live.reload_now()
    bundle = loaded.searcher.bundle
    return {"bundle_version": str(bundle.version), "items": int(len(bundle.items)),
            "added": [], "removed": [str(row["id"])], "rejected": {}}
