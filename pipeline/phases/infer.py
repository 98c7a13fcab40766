"""Search and batch inference over a bundle (pipeline/serving/search.py) from the command line.

    search   one image or text → its ranked items as a table, JSON, or a self-contained HTML grid of the
             bundle's thumbnails (images inlined as data URIs: the file works offline and can be mailed)
    infer    a folder or CSV of query images → results.csv, one row per (query, rank): query_id, rank,
             item_id, score, label, label_name (the "submission" file); files read through tf.data in
             batches, unreadable ones listed in <output>.rejects.csv and skipped; written atomically
Query inputs (`image_inputs`, also what `bundle add` reads): a folder (every image file below it; id = its
path relative to the folder; a first-level sub-folder is its label name), or a CSV/Parquet with a `path`
column (relative to the table's folder) and optional id, label (or label_name), text, group, split.
"""
from __future__ import annotations

import base64
import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.core import atomic
from pipeline.core.errors import PhaseInputError
from pipeline.data.sources import IMAGE_EXTENSIONS, MANIFEST_EXTENSIONS

log = logging.getLogger("embedlab.infer")

RESULT_COLUMNS = ("query_id", "rank", "item_id", "score", "label", "label_name")


@dataclass(frozen=True)
class ImageInput:
    id: str
    path: str
    label_name: str = ""
    text: str = ""
    group: str = ""
    split: str = ""


def image_inputs(source: str | Path) -> tuple[list[ImageInput], list[tuple[str, str]]]:
    """(the images a folder or table names, [(path, why it is skipped)] for what is not an image file)."""
    import pandas as pd

    source = Path(source)
    skipped: list[tuple[str, str]] = []
    if source.is_dir():
        found = []
        for path in sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith(".")):
            relative = path.relative_to(source).as_posix()
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append((relative, f"not an image file extension ({path.suffix or 'none'})"))
                continue
            parts = PurePosixPath(relative).parts
            found.append(ImageInput(id=relative, path=str(path), label_name=parts[0] if len(parts) > 1 else ""))
        return found, skipped
    if source.suffix.lower() not in MANIFEST_EXTENSIONS or not source.is_file():
        raise FileNotFoundError(f"{source} is neither a folder nor a CSV/Parquet table of image paths")
    table = pd.read_parquet(source) if source.suffix.lower() == ".parquet" else \
        pd.read_csv(source, dtype=str, keep_default_na=False)
    if "path" not in table:
        raise ValueError(f"{source} has no 'path' column (columns: {', '.join(map(str, table.columns))})")
    table = table.astype(object).where(table.notna(), "").astype(str)
    found = []
    for record in table.to_dict("records"):
        path = Path(record["path"])
        path = path if path.is_absolute() else source.resolve().parent / path
        found.append(ImageInput(id=record.get("id") or record["path"], path=str(path),
                                label_name=record.get("label_name") or record.get("label", ""),
                                text=record.get("text", ""), group=record.get("group", ""),
                                split=record.get("split", "")))
    return found, skipped


def parse_filters(pairs: list[str] | None) -> dict[str, str]:
    """["label_name=shoes", "split=test"] → {"label_name": "shoes", "split": "test"}."""
    filters = {}
    for pair in pairs or []:
        column, sep, value = pair.partition("=")
        if not sep or not column.strip():
            raise ValueError(f"--filter {pair!r} is not of the form COLUMN=VALUE")
        filters[column.strip()] = value
    return filters


def run_search(bundle_root: str, image: str | None = None, text: str | None = None, k: int = 10,
               filters: dict | None = None, rerank: str | None = None, output: str = "table",
               html_path: str | None = None) -> str:
    """The results of one query as `output` ("table" or "json"); with `html_path`, also that page."""
    from pipeline.serving.bundle import open_bundle
    from pipeline.serving.search import Searcher

    searcher = Searcher(open_bundle(bundle_root))
    if image is not None:
        data = Path(image).read_bytes()
        vectors, errors = searcher.embed_images([data])
        if errors:
            raise PhaseInputError(f"{image}: {errors[0]}")
        query = {"image": str(image)}
    else:
        vectors, data, query = searcher.embed_texts([text]), None, {"text": text}
    hits = searcher.search(vectors, k=k, filters=filters, rerank=rerank)[0]
    bundle = searcher.bundle
    if html_path:
        atomic.write_text(html_path, results_page(bundle, query, data, hits))
        log.info("search: wrote %s", html_path)
    if output == "json":
        return json.dumps({"bundle": str(bundle.root), "version": bundle.version, "query": query,
                           "filters": filters or {}, "rerank": rerank,
                           "results": [h.to_dict() for h in hits]}, indent=2)
    lines = [f"{'rank':>4}  {'score':>7}  {'id':<30} {'label':<16} {'split':<6} text"]
    for h in hits:
        lines.append(f"{h.rank:>4}  {h.score:7.4f}  {h.id[:30]:<30} {h.label_name[:16]:<16} {h.split[:6]:<6} "
                     f"{h.text[:40]}")
    return "\n".join(lines) if hits else "no item matches"


def results_page(bundle, query: dict, query_image: bytes | None, hits) -> str:
    """A self-contained HTML grid: the query, then each hit's thumbnail with rank, score, id and label."""
    from pipeline.serving.thumbnails import media_type

    def data_uri(data: bytes) -> str:
        return f"data:{media_type(data)};base64,{base64.b64encode(data).decode('ascii')}"

    described = html.escape(query.get("text") or Path(query["image"]).name)
    head = (f'<img src="{data_uri(query_image)}" alt="query">' if query_image else "") + f"<p>{described}</p>"
    cells = "".join(
        f'<figure><img src="{data_uri(bundle.thumbnail(h.id))}" alt="{html.escape(h.id)}">'
        f"<figcaption>#{h.rank} · {h.score:.3f}<br>{html.escape(h.label_name)}<br>"
        f"<small>{html.escape(h.id)}</small></figcaption></figure>" for h in hits)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>embedlab search</title><style>"
            "body{font-family:sans-serif;margin:1em}.grid{display:flex;flex-wrap:wrap;gap:12px}"
            "figure{margin:0;width:160px;text-align:center}img{max-width:160px;max-height:160px}"
            ".query{border-bottom:1px solid #ccc;margin-bottom:1em}</style></head><body>"
            f"<div class='query'><h1>Query</h1>{head}<p>bundle {html.escape(str(bundle.root))} "
            f"({bundle.version}), {len(hits)} results</p></div><div class='grid'>{cells}</div></body></html>")


def run_infer(bundle_root: str, queries: str, output: str, k: int = 10, batch_size: int = 32,
              filters: dict | None = None, rerank: str | None = None) -> dict:
    """Answer every query image; returns counts {"queries", "answered", "rejected"}."""
    import tensorflow as tf
    from tqdm.auto import tqdm

    from pipeline.serving.bundle import open_bundle
    from pipeline.serving.search import Searcher

    inputs, skipped = image_inputs(queries)
    rejected = [(path, path, reason) for path, reason in skipped]
    readable = []
    for item in inputs:
        if Path(item.path).is_file():
            readable.append(item)
        else:
            rejected.append((item.id, item.path, "file not found"))
    searcher = Searcher(open_bundle(bundle_root))
    files = tf.data.Dataset.from_tensor_slices([item.path for item in readable] or [""])
    files = files.take(len(readable)).map(tf.io.read_file, num_parallel_calls=tf.data.AUTOTUNE,
                                          deterministic=True)
    answered = 0
    with atomic.atomic_open(output, "w", encoding="utf-8", newline="") as f, \
            tqdm(total=len(readable), desc="infer", unit="img", dynamic_ncols=True) as bar:
        import csv

        writer = csv.writer(f)
        writer.writerow(RESULT_COLUMNS)
        for first, batch in zip(range(0, len(readable), batch_size), files.batch(batch_size).prefetch(2)):
            chunk = readable[first:first + batch_size]
            vectors, errors = searcher.embed_images(batch.numpy().tolist())
            rejected += [(chunk[p].id, chunk[p].path, reason) for p, reason in errors.items()]
            good = [item for p, item in enumerate(chunk) if p not in errors]
            for item, hits in zip(good, searcher.search(vectors, k=k, filters=filters, rerank=rerank) if good else []):
                writer.writerows((item.id, h.rank, h.id, f"{h.score:.6f}", h.label, h.label_name) for h in hits)
            answered += len(good)
            bar.update(len(chunk))
    rejects_path = Path(output).with_suffix(".rejects.csv")
    if rejected:
        import pandas as pd

        with atomic.atomic_open(rejects_path, "w", encoding="utf-8", newline="") as f:
            pd.DataFrame(rejected, columns=["query_id", "path", "reason"]).to_csv(f, index=False)
        for query_id, _, reason in rejected[:10]:
            log.warning("infer: skipped %s: %s", query_id, reason)
        log.warning("infer: %d query file(s) skipped, listed in %s", len(rejected), rejects_path)
    else:
        rejects_path.unlink(missing_ok=True)
    log.info("infer: %d queries answered (top %d) into %s", answered, k, output)
    return {"queries": len(inputs) + len(skipped), "answered": answered, "rejected": len(rejected)}
