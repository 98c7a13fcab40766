"""The serving tools through the command line on the tiny exported bundle: search, infer, bundle add/remove."""
from __future__ import annotations

import base64
import json
import re

import pandas as pd

import run as cli
from pipeline.serving.bundle import current_version, open_bundle


def test_search_prints_a_table_json_and_an_html_grid(exported, tiny_run, tmp_path, capsys):
    images, _ = tiny_run
    query = images / "images/class_1/img_003.png"
    assert cli.main(["search", "--bundle", str(exported), "--image", str(query), "--k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["rank", "score", "id"] and len(table) == 4
    assert re.match(r"\s+1\s+1\.0000\s+class_1/img_003\.png\s+class_1", table[1]), table[1]

    page = tmp_path / "out.html"
    assert cli.main(["search", "--bundle", str(exported), "--image", str(query), "--k", "4", "--json",
                     "--filter", "label_name=class_2", "--html", str(page)]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["version"] == "v0001" and answer["filters"] == {"label_name": "class_2"}
    assert len(answer["results"]) == 4 and {r["label_name"] for r in answer["results"]} == {"class_2"}
    html = page.read_text()
    uris = re.findall(r'src="data:image/(?:png|jpeg);base64,([^"]+)"', html)
    assert len(uris) == 5 and "http" not in html   # the query and 4 thumbnails, inlined: works offline
    bundle = open_bundle(exported)
    assert base64.b64decode(uris[1]) == bundle.thumbnail(answer["results"][0]["id"])


def test_infer_answers_a_folder_skipping_bad_files(exported, tiny_run, tmp_path):
    images, _ = tiny_run
    queries = tmp_path / "queries"
    queries.mkdir()
    for name in ("img_000.png", "img_004.png"):
        (queries / f"c0_{name}").write_bytes((images / "images/class_0" / name).read_bytes())
    (queries / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (queries / "notes.txt").write_text("not an image")
    output = tmp_path / "results.csv"
    assert cli.main(["infer", "--bundle", str(exported), "--queries", str(queries), "--output", str(output),
                     "--k", "5", "--batch-size", "2"]) == 0
    results = pd.read_csv(output, keep_default_na=False)
    assert list(results.columns) == ["query_id", "rank", "item_id", "score", "label", "label_name"]
    assert sorted(results["query_id"].unique()) == ["c0_img_000.png", "c0_img_004.png"]
    assert (results.groupby("query_id")["rank"].apply(list) == [[1, 2, 3, 4, 5]] * 2).all()
    top = results[results["rank"] == 1].set_index("query_id")["item_id"]
    assert top["c0_img_000.png"] == "class_0/img_000.png" and top["c0_img_004.png"] == "class_0/img_004.png"
    rejects = pd.read_csv(tmp_path / "results.rejects.csv")
    assert sorted(rejects["query_id"]) == ["broken.jpg", "notes.txt"]


def test_bundle_add_and_remove_from_the_command_line(bundle_copy, tiny_run, tmp_path, capsys):
    images, _ = tiny_run
    new = tmp_path / "new/shoes"
    new.mkdir(parents=True)
    (new / "s1.png").write_bytes((images / "images/class_3/img_001.png").read_bytes())
    (new / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert cli.main(["bundle", "add", "--bundle", str(bundle_copy), "--images", str(tmp_path / "new")]) == 0
    bundle = open_bundle(bundle_copy)
    assert bundle.version == "v0002" and "shoes/s1.png" in set(bundle.items["id"])
    assert bundle.items.set_index("id").loc["shoes/s1.png", "label_name"] == "shoes"
    assert "shoes/bad.png" not in set(bundle.items["id"])
    assert cli.main(["search", "--bundle", str(bundle_copy), "--image", str(new / "s1.png"), "--k", "2",
                     "--json", "--filter", "split=added"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["id"] == "shoes/s1.png"
    assert cli.main(["bundle", "remove", "--bundle", str(bundle_copy), "--ids", "shoes/s1.png"]) == 0
    assert current_version(bundle_copy) == "v0003"
    assert cli.main(["bundle", "remove", "--bundle", str(bundle_copy), "--ids", "nope"]) == 1
    assert "not in bundle" in capsys.readouterr().err


def test_tool_mistakes_are_one_line_before_any_work(exported, tmp_path, capsys):
    for argv in (["search", "--bundle", str(tmp_path), "--image", "x.jpg"],
                 ["search", "--bundle", str(exported), "--image", str(tmp_path / "missing.jpg")],
                 ["search", "--bundle", str(exported), "--text", "red dress"],
                 ["search", "--bundle", str(exported), "--image", __file__, "--filter", "colour=red"],
                 ["search", "--bundle", str(exported), "--image", __file__, "--k", "0"],
                 ["infer", "--bundle", str(exported), "--queries", str(tmp_path), "--output", "/no/such/dir/r.csv"],
                 ["export", "--run", "nope", "--set", f"runs_dir={tmp_path}"]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (argv, err)
