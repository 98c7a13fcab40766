"""Measure category re-ranking (pipeline.vectors.rerank) in phase-2 style: P@1, P@k, MAP@R with and without it.

    python bench/bench_rerank.py --embeddings runs/R/embeddings/B [--name clothing10] [--k 10] [--vote-k 10]

Protocol (phase 2's defaults): the test split queries the test split, leave-one-out (a query never sees
itself). Each query's category is predicted by `predict_category` over its `--vote-k` nearest test neighbours
(exact `IndexFlatIP` search, the query itself left out), by plain vote and by similarity-weighted vote.

Metrics come from `pipeline.vectors.retrieval.retrieve`, unchanged: it ranks the whole gallery, so re-ranking is
expressed in its input. A query gets [q, sqrt(b) * onehot(predicted category)] and a gallery item
[g, sqrt(b) * onehot(its label)]: their inner product is q.g + b * [same category], every row has norm
sqrt(1 + b), so `retrieve`'s cosine ranks exactly by score + b for the predicted category, i.e. `rerank`'s
"boost" over the whole gallery; "filter" is the same with b = 4 (more than any difference of two cosine
scores, so every item of the predicted category comes first, the rest after them in score order: the fallback).
The last column checks the library function itself: the share of queries whose top k from `rerank` on the
index's top 5k candidates equals that full-gallery ranking (they differ only where fewer than k candidates of
the predicted category are among the 5k, for "filter").

Caveat printed with the table: relevance here is "same label", which is also what the category predicts, so a
filter turns P@k/MAP@R into roughly the accuracy of the k-NN category vote.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.vectors.index import build_index, search  # noqa: E402
from pipeline.vectors.normalize import l2_normalize  # noqa: E402
from pipeline.vectors.rerank import predict_category, rerank  # noqa: E402
from pipeline.vectors.retrieval import retrieve  # noqa: E402

FILTER_BOOST = 4.0  # > 2, the widest gap between two cosine scores
OVERFETCH = 5


def neighbours_without_self(index, queries: np.ndarray, self_rows: np.ndarray, k: int):
    """Top k (rows, scores) of each query, its own gallery row left out (leave-one-out)."""
    scores, rows = search(index, queries, k + 1)
    keep = rows != self_rows[:, None]
    # Keep the first k kept slots of each row (the query itself is normally at rank 1, but a duplicate may
    # outrank it); a stable sort moves the dropped slot to the end.
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)


def with_category(x: np.ndarray, codes: np.ndarray, n_codes: int, boost: float) -> np.ndarray:
    onehot = np.zeros((len(x), n_codes), dtype=np.float32)
    onehot[np.arange(len(x)), codes] = np.sqrt(boost)
    return np.concatenate([x, onehot], axis=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--embeddings", required=True, help="an embedding folder of a run (embeddings.npy, items.csv)")
    parser.add_argument("--name", default="")
    parser.add_argument("--split", default="test")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--vote-k", type=int, default=10)
    parser.add_argument("--boosts", default="0.05,0.1,0.2")
    args = parser.parse_args()
    folder = Path(args.embeddings)
    items = pd.read_csv(folder / "items.csv")
    unit = l2_normalize(np.load(folder / "embeddings.npy"))
    rows = np.flatnonzero(items["split"].to_numpy() == args.split)
    x = unit[rows]
    labels = items["label"].to_numpy()[rows]
    _, codes = np.unique(labels, return_inverse=True)
    n_codes = int(codes.max()) + 1
    self_rows = np.arange(len(rows))
    k = args.k

    index = build_index(x, "flat")
    vote_rows, vote_scores = neighbours_without_self(index, x, self_rows, args.vote_k)
    candidates, candidate_scores = neighbours_without_self(index, x, self_rows, OVERFETCH * k)

    def metrics_of(query: np.ndarray, gallery: np.ndarray):
        result = retrieve(query, labels, gallery, labels, k=k, exclude=self_rows)
        return result.metrics, result.neighbours

    base, _ = metrics_of(x, x)
    table = [("none", "-", "-", base, float("nan"), float("nan"), float("nan"))]
    for method in ("vote", "weighted"):
        predicted = predict_category(codes[vote_rows], vote_scores, method=method)
        accuracy = float(np.mean(predicted == codes))
        for mode, boost in [("filter", FILTER_BOOST)] + [("boost", float(b)) for b in args.boosts.split(",")]:
            metrics, full_top = metrics_of(with_category(x, predicted, n_codes, boost),
                                           with_category(x, codes, n_codes, boost))
            started = time.perf_counter()
            top, _ = rerank(candidates, candidate_scores, codes[candidates], predicted, mode=mode, boost=boost, k=k)
            per_query_us = (time.perf_counter() - started) / len(x) * 1e6
            same = float(np.mean(np.all(top == full_top, axis=1)))
            table.append((mode, method, "-" if mode == "filter" else f"{boost:g}", metrics, accuracy, same,
                          per_query_us))

    name = args.name or folder.name
    print(f"\n{name}: {len(x)} {args.split} queries x {len(x)} {args.split} gallery items (leave-one-out), "
          f"{n_codes} classes, k={k}, category vote over {args.vote_k} neighbours, rerank on {OVERFETCH * k} "
          "candidates\n")
    print(f"| re-rank | category by | boost | P@1 | P@{k} | MAP@R | category accuracy "
          f"| rerank() top {k} = full-gallery | rerank() µs/query |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for mode, method, boost, metrics, accuracy, same, us in table:
        extra = "| - | - | - |" if mode == "none" else f"| {accuracy:.3f} | {same:.3f} | {us:.2f} |"
        print(f"| {mode} | {method} | {boost} | {metrics['P@1']:.3f} | {metrics['P@k']:.3f} "
              f"| {metrics['MAP@R']:.3f} {extra}")
    print("\nRelevance is 'same label', the very thing the category vote predicts: with a filter, a query whose "
          "category is right gets MAP@R near 1 and a wrong one near 0, so these gains measure the k-NN vote's "
          "accuracy more than better similarity.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
