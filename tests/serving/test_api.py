"""The HTTP API with FastAPI's test client: every endpoint, every kind of bad request (a 4xx JSON, never a
5xx), the token rule, bundle swaps while serving, micro-batching. A searcher double stands in for the
model here (tests/serving/searcher_double.py); test_api_bundle.py runs the same app on a real bundle."""
from __future__ import annotations

import asyncio
import logging
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from pipeline.serving.api import Batching, ServeOptions, create_app, read_token_file, serve
from pipeline.serving.uploads import Limits
from tests.serving.api_helpers import (
    assert_json_error, compressed_bomb, double_app, encoded, image_files, noisy_jpeg, png_header_only, truncated_jpeg,
)
from tests.serving.searcher_double import BundleDouble, SearcherDouble


@pytest.fixture
def client():
    app, _ = double_app()
    with TestClient(app) as c:
        yield c


def test_search_by_image_ranks_items_by_score(client):
    response = client.post("/search?k=4", files=image_files(encoded((220, 10, 10))))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"] == "image" and body["k"] == 4 and body["bundle_version"] == "v0001"
    results = body["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4]
    assert all(r["label_name"] == "red" for r in results)      # the double's red items are nearest a red image
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert results[0]["image"] == f"/items/{results[0]['id']}/image"


def test_search_by_vector_matches_brute_force_and_takes_filters():
    app, searcher = double_app()
    query = [0.1, 0.9, 0.2]
    with TestClient(app) as c:
        body = c.post("/search?k=3", json={"vector": query}).json()
        filtered = c.post("/search?k=12&filter=label_name=blue", json={"vector": query}).json()
    unit = np.asarray(query) / np.linalg.norm(query)
    expected = np.argsort(-(searcher.bundle.vectors @ unit))[:3]
    assert [r["id"] for r in body["results"]] == searcher.bundle.items["id"].to_numpy()[expected].tolist()
    assert np.allclose([r["score"] for r in body["results"]], (searcher.bundle.vectors @ unit)[expected], atol=1e-6)
    assert filtered["filters"] == {"label_name": "blue"}
    assert len(filtered["results"]) == 4 and {r["label_name"] for r in filtered["results"]} == {"blue"}


def test_text_search_needs_a_text_model():
    app, _ = double_app(has_text=True)
    with TestClient(app) as c:
        body = c.post("/search?k=2", json={"text": "something green"}).json()
        assert body["query"] == "text" and {r["label_name"] for r in body["results"]} == {"green"}
    with TestClient(double_app(has_text=False)[0]) as c:
        message = assert_json_error(c.post("/search", json={"text": "green"}), 400)
        assert "no text model" in message


def test_embed_gives_the_unit_vector_of_each_kind_of_query():
    app, searcher = double_app(has_text=True)
    with TestClient(app) as c:
        image = c.post("/embed", files=image_files(encoded((10, 10, 200)))).json()
        text = c.post("/embed", json={"text": "red"}).json()
        vector = c.post("/embed", json={"vector": [3, 0, 4]}).json()
    expected = searcher.embed_images([encoded((10, 10, 200))])[0][0]
    assert image["query"] == "image" and image["dim"] == 3 and np.allclose(image["vector"], expected, atol=1e-6)
    assert np.allclose(text["vector"], [1, 0, 0])
    assert np.allclose(vector["vector"], [0.6, 0, 0.8])


def test_items_metadata_and_thumbnail_come_from_the_bundle(client):
    item = client.get("/items/item004").json()
    assert item == {"id": "item004", "label": 1, "label_name": "green", "text": "a green thing", "group": None,
                    "split": "test", "image": "/items/item004/image"}   # no `path`: the exporter's file system
    image = client.get("/items/item004/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content.startswith(b"\x89PNG")
    assert_json_error(client.get("/items/nope"), 404)
    assert_json_error(client.get("/items/nope/image"), 404)
    # A path in the id is just an id that does not exist; nothing is read from the file system.
    assert "no item with id '../../etc/passwd'" in assert_json_error(client.get("/items/..%2F..%2Fetc%2Fpasswd/image"),
                                                                    404)


def test_ids_holding_slashes_are_served():
    """An ingested item's id is its relative path ("shoes/a 1.jpg"): every item route takes it whole."""
    searcher = SearcherDouble(BundleDouble())
    searcher.bundle.items.loc[0, "id"] = "shoes/a 1.jpg"
    app, _ = double_app(searcher=searcher, token="s3cret-token-0123")
    with TestClient(app) as c:
        hit = next(r for r in c.post("/search?k=12", json={"vector": [1, 0, 0]}).json()["results"]
                   if r["id"] == "shoes/a 1.jpg")
        assert hit["image"] == "/items/shoes%2Fa%201.jpg/image"
        assert c.get(hit["image"]).headers["content-type"] == "image/png"
        assert c.get("/items/shoes%2Fa%201.jpg").json()["id"] == "shoes/a 1.jpg"
        assert c.get("/items/shoes/a 1.jpg").json()["id"] == "shoes/a 1.jpg"      # unencoded works too
        assert_json_error(c.get("/items/shoes/a 2.jpg/image"), 404)
        text = c.get("/metrics").text
        assert 'endpoint="/items/{item_id}/image",status="200"' in text


def test_health_and_metrics(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["items"] == 12 and health["has_text"] is False
    assert health["bundle_version"] == "v0001" and health["dim"] == 3 and health["write_api"] is False
    for _ in range(3):
        client.post("/search", json={"vector": [1, 0, 0]})
    client.post("/search?k=0", json={"vector": [1, 0, 0]})
    client.get("/no-such-page")
    text = client.get("/metrics").text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert lines['embedlab_http_requests_total{method="POST",endpoint="/search",status="200"}'] == "3"
    assert lines['embedlab_http_requests_total{method="POST",endpoint="/search",status="422"}'] == "1"
    assert lines['embedlab_http_requests_total{method="GET",endpoint="other",status="404"}'] == "1"
    buckets = [int(v) for k, v in lines.items()
               if k.startswith('embedlab_http_request_duration_seconds_bucket{endpoint="/search"')]
    assert buckets == sorted(buckets) and buckets[-1] == 4                       # cumulative, +Inf = count
    assert lines['embedlab_http_request_duration_seconds_count{endpoint="/search"}'] == "4"
    assert float(lines['embedlab_http_request_duration_seconds_sum{endpoint="/search"}']) > 0
    assert lines["embedlab_bundle_items"] == "12"


def test_page_docs_and_schema_are_served_without_a_cdn(client):
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    docs = client.get("/docs").text
    for html in (page.text, docs):
        assert "http://" not in html and "https://" not in html and "<script>" not in html
    assert client.get("/page/app.js").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/search", "/embed", "/items/{item_id}", "/items/{item_id}/image", "/health", "/metrics"} <= set(
        schema["paths"])
    assert set(schema["paths"]["/search"]["post"]["requestBody"]["content"]) == {"multipart/form-data",
                                                                                 "application/json"}


BAD_REQUESTS = {
    "empty image": (dict(files=image_files(b"")), 400, "empty"),
    "JPEG cut inside its header": (dict(files=image_files(noisy_jpeg()[:300], "q.jpg", "image/jpeg")), 400,
                                   "corrupt JPEG"),
    "truncated JPEG": (dict(files=image_files(truncated_jpeg(), "q.jpg", "image/jpeg")), 422, "decoded"),
    "huge dimensions in the header": (dict(files=image_files(png_header_only(100_000, 100_000))), 413, "pixels"),
    "decompression bomb": (dict(files=image_files(compressed_bomb())), 413, "decompression bomb"),
    "text named .jpg": (dict(files=image_files(b"hello, not an image at all", "cat.jpg", "image/jpeg")), 415,
                        "from its bytes"),
    "HTML named .png": (dict(files=image_files(b"<html><script>alert(1)</script></html>")), 415, "not an image"),
    "wrong field name": (dict(files=image_files(encoded(), field="file")), 400, "no 'image' file"),
    "image as a text field": (dict(data={"image": "abc"}, files={"x": ("x", b"1")}), 400, "must be a file"),
    "two images": (dict(files=[("image", ("a.png", encoded(), "image/png"))] * 2), 400, "one 'image'"),
    "wrong content type": (dict(content=encoded(), headers={"content-type": "image/png"}), 415,
                           "unsupported content type"),
    "no content type": (dict(content=b"x"), 415, "unsupported content type"),
    "multipart without boundary": (dict(content=b"--x\r\n", headers={"content-type": "multipart/form-data"}), 400,
                                   None),
    "broken multipart": (dict(content=b"--b\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=b"}),
                         400, None),
    "oversize JSON": (dict(json={"vector": [0.5] * 100_000}), 413, "limit"),
    "oversize upload": (dict(files=image_files(b"\xff\xd8\xff" + b"\0" * (11 * 2 ** 20))), 413, "limit"),
    "invalid JSON": (dict(content=b"{nope", headers={"content-type": "application/json"}), 400, "not valid JSON"),
    "empty JSON body": (dict(content=b"", headers={"content-type": "application/json"}), 400, "empty"),
    "JSON list": (dict(json=[1, 2, 3]), 400, "must be an object"),
    "NaN in JSON": (dict(content=b'{"vector": [NaN, 1, 1]}', headers={"content-type": "application/json"}), 400,
                    "not a JSON number"),
    "deeply nested JSON": (dict(content=b'{"vector": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                                headers={"content-type": "application/json"}), 400, "not valid JSON"),
    "zero vector": (dict(json={"vector": [0, 0, 0]}), 400, "all zeros"),
    "wrong vector length": (dict(json={"vector": [1, 0]}), 400, "embeddings have 3"),
    "vector of strings": (dict(json={"vector": ["1", 0, 0]}), 400, "list of numbers"),
    "huge integer in vector": (dict(json={"vector": [10 ** 400, 0, 0]}), 400, "too large"),
    "float overflow": (dict(content=b'{"vector": [1e999, 0, 0]}', headers={"content-type": "application/json"}), 400,
                       None),
    "text and vector": (dict(json={"text": "a", "vector": [1, 0, 0]}), 400, "exactly one"),
    "neither text nor vector": (dict(json={}), 400, "exactly one"),
    "k in the body": (dict(json={"vector": [1, 0, 0], "k": 5}), 400, "query parameters"),
    "text not a string": (dict(json={"text": 5}), 400, "must be a string"),
    "k zero": (dict(json={"vector": [1, 0, 0]}, params={"k": 0}), 422, "k"),
    "k over 100": (dict(json={"vector": [1, 0, 0]}, params={"k": 101}), 422, "k"),
    "k not a number": (dict(json={"vector": [1, 0, 0]}, params={"k": "ten"}), 422, "k"),
    "unknown filter column": (dict(json={"vector": [1, 0, 0]}, params={"filter": "colour=red"}), 400,
                              "unknown filter column"),
    "filter without =": (dict(json={"vector": [1, 0, 0]}, params={"filter": "label"}), 400, "column=value"),
    "filter column twice": (dict(json={"vector": [1, 0, 0]}, params=[("filter", "label=1"), ("filter", "label=2")]),
                            400, "twice"),
    "unknown rerank": (dict(json={"vector": [1, 0, 0]}, params={"rerank": "maybe"}), 422, "rerank"),
    "rerank the searcher refuses": (dict(json={"vector": [1, 0, 0]}, params={"rerank": "boost"}), 422,
                                    "cannot search"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_json_error_never_a_5xx(client, case):
    kwargs, status, words = BAD_REQUESTS[case]
    # The client re-raises any server exception: a 5xx here would fail the test before the assertions.
    message = assert_json_error(client.post("/search", **kwargs), status)
    if words:
        assert words in message, message


def test_text_query_checks():
    with TestClient(double_app(has_text=True)[0]) as c:
        assert "empty" in assert_json_error(c.post("/search", json={"text": "   "}), 400)
        assert "1000" in assert_json_error(c.post("/search", json={"text": "x" * 1001}), 400)
        lone_surrogate = b'{"text": "\\ud800 dress"}'
        assert "Unicode" in assert_json_error(
            c.post("/search", content=lone_surrogate, headers={"content-type": "application/json"}), 400)


def test_unknown_routes_and_methods_are_json_errors(client):
    assert "no such endpoint" in assert_json_error(client.get("/nothing-here"), 404)
    assert "not allowed" in assert_json_error(client.get("/search"), 405)
    assert_json_error(client.put("/health"), 405)


def test_an_unexpected_failure_is_a_logged_json_500_and_the_server_lives_on(caplog):
    class Failing(SearcherDouble):
        def search(self, *args, **kwargs):
            raise ArithmeticError("a bug in the searcher")

    app, _ = double_app(searcher=Failing(BundleDouble()))
    with TestClient(app, raise_server_exceptions=False) as c, caplog.at_level(logging.ERROR, "embedlab.serve"):
        response = c.post("/search", json={"vector": [1, 0, 0]})
        assert response.status_code == 500 and "ArithmeticError" in response.json()["error"]
        assert "a bug in the searcher" in caplog.text
        assert c.get("/health").status_code == 200


def test_write_endpoints_exist_only_with_a_token():
    with TestClient(double_app()[0]) as c:
        assert c.post("/items", files=image_files(encoded())).status_code in (404, 405)
        assert c.delete("/items/item001").status_code == 405
        assert "/items" not in c.get("/openapi.json").json()["paths"]
    with TestClient(double_app(token="s3cret-token")[0]) as c:
        assert "/items" in c.get("/openapi.json").json()["paths"]
        missing = c.delete("/items/item001")
        assert_json_error(missing, 401)
        assert missing.headers["www-authenticate"] == "Bearer"
        assert_json_error(c.delete("/items/item001", headers={"Authorization": "Basic s3cret-token"}), 401)
        assert_json_error(c.delete("/items/item001", headers={"Authorization": "Bearer s3cret-tokeN"}), 403)
        assert_json_error(c.post("/items", files=image_files(encoded()), headers={"Authorization": "Bearer x"}), 403)
        not_ascii = {"Authorization": "Bearer s3cr\u00e9t".encode("latin-1")}
        assert_json_error(c.delete("/items/item001", headers=not_ascii), 403)


def test_an_empty_token_is_refused(tmp_path):
    with pytest.raises(ValueError, match="token is empty"):
        double_app(token="  ")
    (tmp_path / "token").write_text("\n  s3cret-token-0123456789  \nignored\n")
    assert read_token_file(tmp_path / "token") == "s3cret-token-0123456789"
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(ValueError, match="at least 16"):
        read_token_file(tmp_path / "short")
    with pytest.raises(ValueError, match="cannot read"):
        read_token_file(tmp_path / "missing")


class VersionedLoader:
    """Loads a double whose version is whatever CURRENT says; `gate` can hold a load back."""

    def __init__(self, fail_on: str | None = None):
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on = fail_on
        self.loads = 0

    def __call__(self, root):
        version = (root / "CURRENT").read_text().strip()
        self.gate.wait(10)
        self.loads += 1
        if version == self.fail_on:
            raise OSError(f"{version} is broken")
        return SearcherDouble(BundleDouble(version=version, n=12 + int(version[1:])))


def test_a_bundle_swapped_on_disk_is_picked_up_without_dropping_requests(tmp_path):
    (tmp_path / "CURRENT").write_text("v0001\n")
    loader = VersionedLoader()
    app = create_app(tmp_path, options=ServeOptions(reload_check_ms=20), loader=loader)
    with TestClient(app) as c:
        assert c.get("/health").json()["bundle_version"] == "v0001"
        loader.gate.clear()                            # the new version takes a while to load...
        (tmp_path / "CURRENT").write_text("v0002\n")
        seen = set()
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:             # ...and every request meanwhile gets the old one
            response = c.post("/search?k=1", json={"vector": [1, 0, 0]})
            assert response.status_code == 200
            seen.add(response.json()["bundle_version"])
        assert seen == {"v0001"}
        loader.gate.set()
        for _ in range(200):
            if c.get("/health").json()["bundle_version"] == "v0002":
                break
            time.sleep(0.02)
        health = c.get("/health").json()
        assert health["bundle_version"] == "v0002" and health["items"] == 14 and loader.loads == 2


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(tmp_path):
    (tmp_path / "CURRENT").write_text("v0001\n")
    loader = VersionedLoader(fail_on="v0002")
    app = create_app(tmp_path, options=ServeOptions(reload_check_ms=10), loader=loader)
    with TestClient(app) as c:
        (tmp_path / "CURRENT").write_text("v0002\n")
        for _ in range(200):
            health = c.get("/health").json()
            if health["reload_error"]:
                break
            time.sleep(0.02)
        assert health["bundle_version"] == "v0001" and "v0002 is broken" in health["reload_error"]
        assert c.post("/search", json={"vector": [1, 0, 0]}).status_code == 200
        time.sleep(0.05)
        c.get("/health")
        assert loader.loads == 2                       # the broken version is not retried until CURRENT moves


class SlowSearcher(SearcherDouble):
    def embed_images(self, images):
        time.sleep(0.03)                               # a model call long enough for requests to queue
        return super().embed_images(images)


@pytest.mark.parametrize("max_wait_ms", [0.0, 5.0])
def test_micro_batching_answers_concurrent_requests_in_fewer_model_calls(max_wait_ms):
    searcher = SlowSearcher(BundleDouble())
    app, _ = double_app(searcher=searcher, batching=Batching(enabled=True, max_batch=4, max_wait_ms=max_wait_ms))
    colours = [(250, 5, 5), (5, 250, 5), (5, 5, 250), (200, 200, 5), (5, 200, 200), (200, 5, 200), (90, 90, 90)]

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await asyncio.gather(*(c.post("/embed", files=image_files(encoded(colour))) for colour in colours))

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    batcher = app.state.serving.batcher
    assert sum(batcher.batch_sizes) == len(colours) and max(batcher.batch_sizes) > 1
    assert max(batcher.batch_sizes) <= 4 and len(searcher.calls) < len(colours)
    for colour, response in zip(colours, responses):                     # each answer is its own image's
        alone = SearcherDouble(BundleDouble()).embed_images([encoded(colour)])[0][0]
        assert np.allclose(response.json()["vector"], alone, atol=1e-6)


def test_micro_batching_keeps_a_bad_image_to_its_own_request():
    app, _ = double_app(batching=Batching(enabled=True, max_batch=8, max_wait_ms=20))

    async def pair():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await asyncio.gather(c.post("/embed", files=image_files(encoded())),
                                        c.post("/embed", files=image_files(truncated_jpeg(), "t.jpg")))

    good, bad = asyncio.run(pair())
    assert good.status_code == 200 and bad.status_code == 422
    assert list(app.state.serving.batcher.batch_sizes) == [2]
    with TestClient(app) as c:
        text = c.get("/metrics").text
    assert "embedlab_microbatch_model_calls_total 1\n" in text and "embedlab_microbatch_images_total 2\n" in text


def test_limits_are_configurable_and_checked():
    app, _ = double_app(limits=Limits(max_pixels=100))
    with TestClient(app) as c:
        assert "100-pixel limit" in assert_json_error(c.post("/search", files=image_files(encoded(size=(11, 10)))), 413)
        assert c.post("/search", files=image_files(encoded(size=(10, 10)))).status_code == 200
    with pytest.raises(ValueError, match="max_pixels"):
        Limits(max_pixels=0)


def test_serve_binds_to_loopback_unless_told_otherwise():
    import inspect

    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"


def test_each_search_thread_runs_faiss_with_the_configured_thread_count():
    import faiss

    if faiss.omp_get_max_threads() < 2:
        pytest.skip("one core: nothing to tell apart")

    class Recording(SearcherDouble):
        threads: list[int] = []

        def search(self, *args, **kwargs):
            self.threads.append(faiss.omp_get_max_threads())   # in the worker thread that searches
            return super().search(*args, **kwargs)

    searcher = Recording(BundleDouble())
    for configured, expected in ((1, 1), (2, 2)):
        app, _ = double_app(searcher=searcher, faiss_threads=configured)
        with TestClient(app) as c:
            for _ in range(3):
                assert c.post("/search", json={"vector": [1, 0, 0]}).status_code == 200
        assert searcher.threads[-3:] == [expected] * 3


def test_health_names_the_model_by_its_tag_not_a_dict():
    from pipeline.serving.api import model_name

    assert model_name({"source": {"tag": "mobilenet-a0.25-96-imagenet+triplet"},
                       "backbone": {"name": "mobilenet", "params": {"alpha": 0.25}}}) == \
        "mobilenet-a0.25-96-imagenet+triplet"
    assert model_name({"backbone": {"name": "clip"}}) == "clip"
    assert model_name({"backbone": "tiny-test-model"}) == "tiny-test-model"
