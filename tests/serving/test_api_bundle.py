"""The HTTP API end to end on a real bundle (pipeline.serving.bundle + search + a tiny exported model):
answers equal to the in-process Searcher and to brute force, thumbnails from the bundle, uploads the
model side refuses, adds and removes over HTTP, and a swap written by another process while serving."""
from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pipeline.serving.api import Batching, ServeOptions, create_app
from tests.serving.api_helpers import assert_json_error, image_files, truncated_jpeg
from tests.serving.tiny_bundle import class_image, copy_bundle, shared_tiny_bundle

TOKEN = "test-token-0123456789"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    pytest.importorskip("tensorflow")
    return shared_tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def client(bundle):
    with TestClient(create_app(bundle[0])) as c:
        yield c


def test_health_describes_the_bundle(client):
    health = client.get("/health").json()
    assert health == {**health, "status": "ok", "bundle_version": "v0001", "items": 24, "has_text": False,
                      "dim": 16, "backbone": "tiny-test-model", "write_api": False, "reload_error": None}


def test_an_uploaded_collection_image_gives_its_stored_embedding_and_finds_its_class(client, bundle):
    root, info = bundle
    embedded = client.post("/embed", files=image_files(info["images"]["blue-2"])).json()
    assert np.max(np.abs(np.asarray(embedded["vector"]) - info["embeddings"]["blue-2"])) < 1e-5
    body = client.post("/search?k=6", files=image_files(info["images"]["blue-2"])).json()
    assert [r["label_name"] for r in body["results"]] == ["blue"] * 6
    assert "blue-2" in [r["id"] for r in body["results"]] and body["results"][0]["score"] == pytest.approx(1, abs=1e-4)


def test_vector_search_equals_brute_force_over_the_bundle(client, bundle):
    root, info = bundle
    ids = list(info["embeddings"])
    matrix = np.stack([info["embeddings"][i] for i in ids])
    query = matrix[ids.index("green-3")] + matrix[ids.index("yellow-1")]
    body = client.post("/search?k=5", json={"vector": query.tolist()}).json()
    exact = matrix @ (query / np.linalg.norm(query))
    assert np.allclose([r["score"] for r in body["results"]], np.sort(exact)[::-1][:5], atol=1e-5)
    for r in body["results"]:
        assert r["score"] == pytest.approx(exact[ids.index(r["id"])], abs=1e-5)


def test_filters_restrict_to_matching_items(client):
    body = client.post("/search?k=24&filter=split=test&filter=label_name=red", json={"vector": [1.0] * 16}).json()
    assert sorted(r["id"] for r in body["results"]) == ["red-0", "red-3"]
    assert_json_error(client.post("/search?filter=colour=red", json={"vector": [1.0] * 16}), 400)


def test_rerank_keeps_or_lifts_the_predicted_category(client, bundle):
    mixed = bundle[1]["embeddings"]["blue-1"] * 0.5 + bundle[1]["embeddings"]["green-1"] * 0.5
    plain = client.post("/search?k=12", json={"vector": mixed.tolist()}).json()
    masked = client.post("/search?k=12&rerank=category", json={"vector": mixed.tolist()}).json()
    boosted = client.post("/search?k=12&rerank=boost", json={"vector": mixed.tolist()}).json()
    assert masked["rerank"] == "category" and boosted["rerank"] == "boost" and plain["rerank"] == "off"
    assert len({r["label_name"] for r in plain["results"][:6]}) == 2         # halfway: blue and green interleave
    # Re-ranked, the predicted category's 6 items come first, then the rest.
    predicted = masked["results"][0]["label_name"]
    assert [r["label_name"] for r in masked["results"]][:6] == [predicted] * 6
    assert [r["label_name"] for r in boosted["results"]][:6] == [predicted] * 6
    assert {r["label_name"] for r in masked["results"][6:]} == {"blue", "green"} - {predicted}
    assert_json_error(client.post("/search?rerank=yes", json={"vector": mixed.tolist()}), 422)


def test_item_metadata_and_thumbnail_are_the_bundles(client, bundle):
    assert client.get("/items/yellow-4").json() == {
        "id": "yellow-4", "label": 3, "label_name": "yellow", "text": "a yellow square number 4", "group": "g0",
        "split": "train", "image": "/items/yellow-4/image"}
    image = client.get("/items/yellow-4/image")
    assert image.headers["content-type"] == "image/png" and image.content == bundle[1]["images"]["yellow-4"]


def as_format(data: bytes, fmt: str, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert(mode).save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize("fmt,mode", [("JPEG", "CMYK"), ("GIF", "P"), ("BMP", "RGB"), ("WEBP", "RGB"),
                                      ("TIFF", "RGB"), ("PNG", "LA")])
def test_every_sniffed_format_is_embedded(client, bundle, fmt, mode):
    response = client.post("/search?k=3", files=image_files(as_format(bundle[1]["images"]["red-5"], fmt, mode),
                                                           "no-extension", "application/octet-stream"))
    assert response.status_code == 200, response.text
    if mode != "LA":   # grey+alpha loses the colour
        assert [r["label_name"] for r in response.json()["results"]] == ["red"] * 3


def test_uploads_the_model_side_refuses_are_4xx(client):
    assert "decoded" in assert_json_error(client.post("/search", files=image_files(truncated_jpeg())), 422)
    assert "no text model" in assert_json_error(client.post("/search", json={"text": "red"}), 400)


def test_micro_batched_answers_equal_single_ones(bundle):
    import asyncio

    import httpx

    root, info = bundle
    app = create_app(root, options=ServeOptions(batching=Batching(enabled=True, max_batch=8, max_wait_ms=20)))
    ids = ["red-1", "green-2", "blue-3", "yellow-4", "red-5"]

    async def burst():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await asyncio.gather(*(c.post("/embed", files=image_files(info["images"][i])) for i in ids))

    responses = asyncio.run(burst())
    assert max(app.state.serving.batcher.batch_sizes) > 1
    for item_id, response in zip(ids, responses):
        assert np.max(np.abs(np.asarray(response.json()["vector"]) - info["embeddings"][item_id])) < 1e-5


def test_add_and_remove_over_http_with_the_token(bundle, tmp_path):
    root = copy_bundle(bundle[0], tmp_path / "bundle")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    new_image = class_image(2, 40)
    with TestClient(create_app(root, token=TOKEN)) as c:
        assert_json_error(c.post("/items", files=image_files(new_image), headers={"Authorization": "Bearer no"}), 403)
        assert c.get("/health").json()["bundle_version"] == "v0001"
        files = [("image", ("a.png", new_image, "image/png")), ("image", ("b.png", class_image(0, 41), "image/png"))]
        added = c.post("/items", files=files, headers=auth,
                       data={"metadata": '[{"id": "blue-new", "label_name": "blue"}, {"label_name": "red"}]'})
        assert added.status_code == 201, added.text
        body = added.json()
        assert body["bundle_version"] == "v0002" and body["items"] == 26 and body["added"][0] == "blue-new"
        assert body["added"][1].startswith("img-")                      # no id given: named by its content
        assert c.get("/items/blue-new").json()["label_name"] == "blue"
        top = c.post("/search?k=1", files=image_files(new_image)).json()["results"][0]
        assert top["id"] == "blue-new" and top["score"] == pytest.approx(1, abs=1e-4)
        assert "already" in assert_json_error(c.post("/items", files=image_files(new_image), headers=auth,
                                                     data={"metadata": '[{"id": "blue-new"}]'}), 409)
        assert_json_error(c.post("/items", files=image_files(b"not an image"), headers=auth), 415)
        assert_json_error(c.post("/items", files=image_files(new_image), headers=auth, data={"metadata": "[1]"}), 400)
        removed = c.delete("/items/blue-new", headers=auth)
        assert removed.status_code == 200 and removed.json()["bundle_version"] == "v0003"
        assert_json_error(c.get("/items/blue-new"), 404)
        assert_json_error(c.delete("/items/blue-new", headers=auth), 404)
        assert c.get("/health").json()["items"] == 25


def test_a_version_written_by_another_process_is_served_without_failed_requests(bundle, tmp_path):
    from pipeline.serving.bundle import remove_items

    root = copy_bundle(bundle[0], tmp_path / "bundle")
    app = create_app(root, options=ServeOptions(reload_check_ms=50))
    statuses, versions, stop = [], set(), threading.Event()
    with TestClient(app) as c:
        def hammer():
            while not stop.is_set():
                response = c.post("/search?k=3", json={"vector": [1.0] * 16})
                statuses.append(response.status_code)
                versions.add(response.json().get("bundle_version"))

        reader = threading.Thread(target=hammer)
        reader.start()
        try:
            time.sleep(0.2)
            remove_items(root, ["red-0", "red-1"])          # what `run.py bundle remove` does
            deadline = time.monotonic() + 30
            while c.get("/health").json()["bundle_version"] != "v0002" and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)
        finally:
            stop.set()
            reader.join()
        assert c.get("/health").json()["items"] == 22
        assert_json_error(c.get("/items/red-0"), 404)
    assert statuses and set(statuses) == {200} and versions == {"v0001", "v0002"}
