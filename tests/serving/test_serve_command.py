"""`python run.py serve`: the command a user types, as a separate process on a free loopback port."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import run as cli
from tests.serving.tiny_bundle import class_image, shared_tiny_bundle

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return shared_tiny_bundle(tmp_path_factory)[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, data: bytes | None = None, headers: dict | None = None):
    request = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()


def test_serve_answers_health_and_an_image_search(bundle, tmp_path):
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "run.py", "serve", "--bundle", str(bundle), "--port", str(port)],
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                status, body = _get(f"{base}/health")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((tmp_path / "serve.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        health = json.loads(body)
        assert status == 200 and health["items"] > 0 and health["bundle_version"]
        boundary = "embedlab-test"
        payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.png\"\r\n"
                   f"Content-Type: application/octet-stream\r\n\r\n").encode() + class_image(0, 0) + \
            f"\r\n--{boundary}--\r\n".encode()
        content_type = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        status, body = _get(f"{base}/search?k=3", payload, content_type)
        results = json.loads(body)
        assert status == 200 and len(results["results"]) == 3
        scores = [hit["score"] for hit in results["results"]]
        assert scores == sorted(scores, reverse=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_serve_mistakes_are_one_line_before_anything_loads(bundle, tmp_path, capsys):
    assert cli.main(["serve", "--bundle", str(tmp_path / "nothing")]) == 2
    assert "no bundle" in capsys.readouterr().err
    assert cli.main(["serve", "--bundle", str(bundle), "--port", "0"]) == 2
    assert "--port" in capsys.readouterr().err
    short = tmp_path / "token"
    short.write_text("abc\n")
    assert cli.main(["serve", "--bundle", str(bundle), "--token-file", str(short)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
