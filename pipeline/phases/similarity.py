"""The `similarity` command: how similar two images are (or every pair of a list) under a run's model.

    python run.py similarity --model RUN/MODEL a.jpg b.jpg                 prints the cosine similarity
    python run.py similarity --model RUN/MODEL --pairs pairs.csv --output scores.csv

MODEL names a trained model, `BACKBONE+LOSS` or `BACKBONE/LOSS` (phase 3's runs/<run>/train/<backbone>/<loss>/
embedding_model.keras), or a phase-1 backbone `BACKBONE` (rebuilt from runs/<run>/embeddings/<backbone>/meta.json
with the weights it was extracted with); BACKBONE is the artifact tag of the run's folders. `--model` may also
be a model folder itself (one holding embedding_model.keras). pairs.csv has columns `a` and `b` (image paths,
relative ones resolved against the CSV's folder) and any others, which are kept; scores.csv adds `score` (cosine,
empty where a file cannot be used) and `error` (why), written atomically. Arguments, the model's location and
the pairs table are checked before TensorFlow loads; every error is one line.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("embedlab.similarity")

MODEL_FILE = "embedding_model.keras"
# A run name or an artifact folder name: no path separators, no "..".
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*")
HELP = "cosine similarity of two images, or of every pair of a CSV, under a run's model"


class SimilarityError(ValueError):
    """A model, an image or a pairs table the command cannot use."""


@dataclass(frozen=True)
class ModelSource:
    kind: str           # "trained": an embedding_model.keras; "backbone": a phase-1 extractor to rebuild
    path: Path          # the .keras file, or the embeddings folder holding meta.json
    name: str


def add_arguments(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("similarity", help=HELP, description=HELP)
    p.add_argument("--model", required=True, metavar="RUN/MODEL",
                   help="RUN/BACKBONE+LOSS or RUN/BACKBONE/LOSS (a phase-3 model), RUN/BACKBONE (a phase-1 "
                        "backbone), or a folder holding embedding_model.keras")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="two image files")
    p.add_argument("--pairs", metavar="CSV", help="a CSV with columns a, b (image paths) to score in batches")
    p.add_argument("--output", metavar="CSV", help="where --pairs writes its scores (columns of the input + score, "
                                                   "error)")
    p.add_argument("--runs-dir", default="runs", help="where the runs are (default runs)")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug lines too")
    return p


def resolve_model(spec: str, runs_dir: str | Path = "runs") -> ModelSource:
    """Where a `--model` value points; SimilarityError (one line) when nothing usable is there."""
    folder = Path(spec)
    if folder.is_dir():
        if (folder / MODEL_FILE).is_file():
            return ModelSource("trained", folder / MODEL_FILE, str(folder))
        raise SimilarityError(f"{spec}: no {MODEL_FILE} in this folder (phase 3 writes it in "
                              "runs/<run>/train/<backbone>/<loss>/; give RUN/BACKBONE for a phase-1 backbone)")
    parts = spec.strip("/").split("/")
    if len(parts) not in (2, 3) or not all(_NAME.fullmatch(part) for part in parts):
        raise SimilarityError(f"--model {spec!r}: expected RUN/BACKBONE, RUN/BACKBONE+LOSS, RUN/BACKBONE/LOSS or a "
                              f"folder holding {MODEL_FILE}")
    run = Path(runs_dir) / parts[0]
    if not run.is_dir():
        raise SimilarityError(f"--model {spec!r}: no run {parts[0]!r} in {runs_dir}")
    if len(parts) == 3 or "+" in parts[1]:
        tag, loss = (parts[1], parts[2]) if len(parts) == 3 else parts[1].split("+", 1)
        model_file = run / "train" / tag / loss / MODEL_FILE
        if not model_file.is_file():
            trained = sorted(f"{p.parent.name}+{p.name}" for p in run.glob("train/*/*") if (p / MODEL_FILE).is_file())
            raise SimilarityError(f"--model {spec!r}: no trained model at {model_file} (run phase3 with "
                                  f"train.export on); trained models of the run: {', '.join(trained) or 'none'}")
        return ModelSource("trained", model_file, f"{parts[0]}/{tag}+{loss}")
    embeddings = run / "embeddings" / parts[1]
    if not (embeddings / "meta.json").is_file():
        found = sorted(p.name for p in run.glob("embeddings/*") if (p / "meta.json").is_file() and "+" not in p.name)
        raise SimilarityError(f"--model {spec!r}: no phase-1 backbone {parts[1]!r} in {run / 'embeddings'}; "
                              f"backbones of the run: {', '.join(found) or 'none'}")
    return ModelSource("backbone", embeddings, f"{parts[0]}/{parts[1]}")


def read_pairs(path: str | Path):
    """The pairs table (every column kept as text); SimilarityError when it is unreadable or lacks a, b."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise SimilarityError(f"--pairs: {path} not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - pandas raises many kinds
        raise SimilarityError(f"--pairs: cannot read {path}: {exc}") from exc
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in ("a", "b") if c not in table.columns]
    if missing:
        raise SimilarityError(f"--pairs: {path} lacks column(s) {missing} (image paths a, b); found "
                              f"{list(table.columns)}")
    return table


def load_model(source: ModelSource):
    import keras

    import models.classifier  # noqa: F401  (custom objects of saved models)
    import models.layers  # noqa: F401
    from pipeline.core import atomic

    if source.kind == "trained":
        return keras.saving.load_model(source.path, compile=False)
    from models.backbones import build_feature_extractor

    from pipeline.config import BackboneConfig

    meta = atomic.read_json(source.path / "meta.json")
    if meta.get("trained"):
        raise SimilarityError(f"{source.path} holds a trained model's embeddings: name it as BACKBONE+LOSS")
    backbone = BackboneConfig(**meta["backbone"])
    return build_feature_extractor(**backbone.extractor_options(weights_fallback="error", with_text=False)).model


def check_arguments(args) -> None:
    """Everything that needs no TensorFlow (SimilarityError otherwise)."""
    if args.batch_size < 1:
        raise SimilarityError("--batch-size must be at least 1")
    if args.pairs:
        if args.images:
            raise SimilarityError("give either two images or --pairs, not both")
        if not args.output:
            raise SimilarityError("--pairs needs --output (the CSV of scores to write)")
    elif len(args.images) != 2:
        raise SimilarityError(f"give two images (got {len(args.images)}), or --pairs CSV --output CSV")
    elif args.output:
        raise SimilarityError("--output goes with --pairs")


def run_similarity(args) -> str:
    """Score what the arguments ask for; returns what the command prints."""
    from pipeline.core.atomic import atomic_open
    from pipeline.serving.pair_scores import pair_similarities, resolve_pair_paths

    source = resolve_model(args.model, args.runs_dir)
    table = read_pairs(args.pairs) if args.pairs else None
    model = load_model(source)
    if table is None:
        scores, reasons = pair_similarities(model, [(args.images[0], args.images[1])], args.batch_size)
        if reasons[0]:
            raise SimilarityError(reasons[0])
        return f"{scores[0]:.6f}"
    pairs = resolve_pair_paths(table, Path(args.pairs).resolve().parent)
    scores, reasons = pair_similarities(model, pairs, args.batch_size, progress=True)
    table["score"] = [f"{s:.6f}" if s == s else "" for s in scores]
    table["error"] = reasons
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(args.output, "w", encoding="utf-8", newline="") as f:
        table.to_csv(f, index=False)
    failed = sum(bool(r) for r in reasons)
    if failed:
        log.warning("similarity: %d of %d pairs not scored (a file could not be used; see the error column)",
                    failed, len(pairs))
    return f"{len(pairs) - failed} of {len(pairs)} pairs scored with {source.name} -> {args.output}"


def main(args) -> int:
    """The command: one-line errors, exit 2 for bad arguments (before TensorFlow loads), 1 for bad inputs."""
    from pipeline.core.logging_setup import import_tensorflow_quietly, setup_logging

    setup_logging(verbose=args.verbose)
    try:
        check_arguments(args)
        resolve_model(args.model, args.runs_dir)
    except SimilarityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import_tensorflow_quietly()
    try:
        print(run_similarity(args))
    except (SimilarityError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
