"""Bench 8: how far frozen features go without metric learning.

Classic retrieval post-processing, fitted on the training split's phase-1 features
only (no labels used) and applied to the evaluation split: centring on the training
mean, PCA whitening (with the eigenvalue shrinkage of Radenović et al.: each component
is divided by sqrt(λ + mean λ), so noise directions are not blown up), and signed
square-root ("power") normalisation. Leave-one-out retrieval over the evaluation split,
cosine, exactly as phase 2 scores it. It tells how much of a trained model's gain a
label-free linear correction of the same features already gives.

    python bench/bench_frozen_postprocessing.py RUN_DIR [--backbone TAG] [--query-split test]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.core.artifacts import load_embeddings  # noqa: E402
from pipeline.vectors.retrieval import retrieve  # noqa: E402


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def signed_sqrt(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.sqrt(np.abs(x))


def whitening(train: np.ndarray, shrink: bool) -> tuple[np.ndarray, np.ndarray]:
    """(mean, projection) of PCA whitening fitted on `train` rows."""
    mean = train.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov((train - mean).T))
    eigenvalues = np.maximum(eigenvalues, 0.0)
    offset = eigenvalues.mean() if shrink else 1e-9
    return mean, eigenvectors / np.sqrt(eigenvalues + offset)


def variants(train: np.ndarray, test: np.ndarray):
    """(name, evaluation-split vectors) for each post-processing of the raw pooled features."""
    yield "L2 (phase 2, baseline)", unit_rows(test)
    train_unit, test_unit = unit_rows(train), unit_rows(test)
    yield "centred on the training mean", unit_rows(test_unit - train_unit.mean(axis=0))
    for shrink in (False, True):
        mean, projection = whitening(train_unit, shrink)
        name = "PCA-whitened, shrunk" if shrink else "PCA-whitened"
        yield name, unit_rows((test_unit - mean) @ projection)
    train_sqrt, test_sqrt = unit_rows(signed_sqrt(train)), unit_rows(signed_sqrt(test))
    yield "signed sqrt, centred", unit_rows(test_sqrt - train_sqrt.mean(axis=0))
    mean, projection = whitening(train_sqrt, True)
    yield "signed sqrt, PCA-whitened, shrunk", unit_rows((test_sqrt - mean) @ projection)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--backbone", default="", help="embeddings/<tag>; default: the only untrained one")
    parser.add_argument("--fit-split", default="train")
    parser.add_argument("--query-split", default="test")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    tags = [p.name for p in sorted((args.run_dir / "embeddings").iterdir()) if "+" not in p.name]
    tag = args.backbone or (tags[0] if len(tags) == 1 else "")
    if not tag:
        sys.exit(f"several phase-1 backbones in {args.run_dir}: choose one with --backbone ({', '.join(tags)})")
    items, _, raw, _ = load_embeddings(args.run_dir / "embeddings" / tag)
    split = items["split"].to_numpy()
    train, test = raw[split == args.fit_split], raw[split == args.query_split]
    labels = items["label"].to_numpy()[split == args.query_split]
    if len(train) < 2 or len(test) < 2:
        sys.exit(f"need at least two rows in the {args.fit_split!r} and {args.query_split!r} splits")

    results = []
    print(f"{tag}: fitted on {len(train)} {args.fit_split} rows, leave-one-out over {len(test)} "
          f"{args.query_split} rows, cosine\n")
    print("| post-processing | P@1 | P@5 | mAP | MAP@R |\n|---|---:|---:|---:|---:|")
    for name, vectors in variants(train.astype(np.float64), test.astype(np.float64)):
        result = retrieve(vectors.astype(np.float32), labels, vectors.astype(np.float32), labels,
                          metric="cosine", k=5, exclude=np.arange(len(labels)))
        m = {key: float(result.metrics[key]) for key in ("P@1", "P@k", "mAP", "MAP@R")}
        results.append({"post_processing": name, **m})
        print(f"| {name} | {m['P@1']:.3f} | {m['P@k']:.3f} | {m['mAP']:.3f} | {m['MAP@R']:.3f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"backbone": tag, "results": results}, indent=2))


if __name__ == "__main__":
    main()
