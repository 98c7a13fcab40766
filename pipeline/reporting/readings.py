"""The sentences the reports write about their numbers.

Each reading follows from every number it cites, and says so when the sample is too small to conclude: a
sentence that contradicts its own table (or concludes from a handful of queries) is worse than none.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Mapping

import numpy as np

from pipeline.reporting.formatting import fmt, fmt_magnitude, get, to_float

# Below this many scored queries a difference between two variants or models is not evidence of anything:
# one query flips P@1 by more than 3 points.
MIN_QUERIES_TO_CONCLUDE = 30
# Differences below this are "no measurable difference" (the tables show three decimals).
NEGLIGIBLE = 0.0005
# Anisotropy: a change of mean pairwise cosine smaller than this, or of effective rank within this
# relative band, is no change.
COSINE_CHANGE = 0.01
RANK_CHANGE = 0.10


def too_few(n: Any) -> bool:
    number = to_float(n)
    return number is not None and number < MIN_QUERIES_TO_CONCLUDE


def small_sample_note(n: Any) -> str:
    """A sentence to add where a conclusion rests on `n` scored queries, or "" when n is enough."""
    if not too_few(n):
        return ""
    return (f"Only {int(n)} quer{'y was' if int(n) == 1 else 'ies were'} scored: too few to conclude from "
            f"differences between these numbers (at least {MIN_QUERIES_TO_CONCLUDE} are needed).")


# --------------------------------------------------------------------------- phase 2: variants

def _delta_phrase(name: str, raw: float | None, unit: float | None) -> str | None:
    if raw is None or unit is None:
        return None
    return f"{name} {fmt(raw)} raw vs {fmt(unit)} unit/cosine ({raw - unit:+.3f})"


def normalising_verdict(deltas: Mapping[str, float], n_scored: Any) -> str:
    """What raw-minus-unit differences (per metric) say about L2 normalisation, on `n_scored` queries."""
    moves = {name: (0 if abs(d) < NEGLIGIBLE else (1 if d > 0 else -1)) for name, d in deltas.items()}
    disagree = 1 in moves.values() and -1 in moves.values()
    if too_few(n_scored):
        text = f"with only {int(n_scored)} scored queries that is too few to conclude whether normalising helps"
        if disagree:
            text += " (and the metrics disagree: " + ", ".join(
                f"{name} {'higher' if m > 0 else 'lower'} raw" for name, m in moves.items() if m) + ")"
        return text
    if disagree:
        return ("the metrics disagree (" + ", ".join(f"{name} {'higher' if m > 0 else 'lower'} raw"
                                                     for name, m in moves.items() if m)
                + "), so neither variant is better")
    if not any(moves.values()):
        return "the norms make no measurable difference here"
    if -1 in moves.values():
        return "normalising helps: the norms of the raw features add noise to the ranking"
    return "the raw norms carry useful information here: normalising costs accuracy"


def _sampled_identity_text(sampled: Mapping, agreement: float | None) -> tuple[str, str]:
    """The identity check of a run that ranked only a sample of queries by real euclidean distance."""
    n = sampled.get("n_sampled")
    share = f"{agreement:.1%} of them identical index for index" if agreement is not None else "their share unknown"
    if sampled.get("holds") is True:
        rest = "" if agreement is not None and agreement >= 1 else (
            "; the others differ only in the order of neighbours whose scores are equal up to float rounding")
        return (f"This run checked it on a seeded sample of {n} queries, ranked again by real Euclidean distance: "
                f"the same top-k lists as unit/cosine ({share}{rest}), with ‖a − b‖² = 2 − 2·cos at every rank. "
                "So unit/euclidean's neighbours and metrics are read off unit/cosine rather than computed in a "
                "second pass, and the identical-list share comes from that sample, not from every query."), "ok"
    return (f"This run did not confirm it: on a seeded sample of {n} queries ranked again by real Euclidean "
            f"distance, the top-k lists or distances differed from unit/cosine beyond float rounding ({share}; "
            f"largest error in ‖a − b‖² {to_float(sampled.get('max_sq_distance_error')) or 0:.2g}), which means "
            "the vectors were not unit length. unit/euclidean was therefore computed in its own full pass."), "warn"


def query_sample_text(metrics: Mapping) -> str | None:
    """A sentence on how the queries were drawn when only a sample of the query split was scored."""
    protocol = metrics.get("protocol") if isinstance(metrics.get("protocol"), Mapping) else {}
    drawn = protocol.get("query_sample")
    if not isinstance(drawn, Mapping):
        return None
    return (f"Queries: {drawn.get('n_sampled')} of the {drawn.get('n_available')} items of the query split "
            f"(evaluate.max_queries = {drawn.get('max_queries')}), drawn {drawn.get('method')} with seed "
            f"{drawn.get('seed')}; the gallery is complete. Every metric is a mean over these queries.")


def equivalence_text(metrics: Mapping) -> dict:
    identical = metrics.get("rankings_identical_unit")
    agreement = to_float(metrics.get("topk_agreement_unit"))
    rule = ("On L2-normalised vectors cosine similarity and Euclidean distance rank neighbours identically, "
            "because ‖a − b‖² = 2 − 2·cos(a, b) when ‖a‖ = ‖b‖ = 1.")
    sampled = metrics.get("unit_identity") if isinstance(metrics.get("unit_identity"), Mapping) else None
    if sampled is not None:
        check, status = _sampled_identity_text(sampled, agreement)
    elif identical is True:
        check = "This run confirmed it: unit/cosine and unit/euclidean returned the same top-k lists"
        check += f" ({agreement:.1%} of queries identical)." if agreement is not None else "."
        status = "ok"
    elif identical is False:
        check = ("This run did not confirm it: the unit/cosine and unit/euclidean top-k lists differed"
                 + (f" ({agreement:.1%} of queries identical)" if agreement is not None else "")
                 + ". Small differences come from ties and float rounding between near-equal scores; "
                   "large ones mean the vectors were not unit length.")
        status = "warn"
    else:
        check = "This run did not record whether the two rankings matched."
        status = "unknown"

    retrieval = metrics.get("retrieval") if isinstance(metrics.get("retrieval"), Mapping) else {}
    unit = retrieval.get("unit/cosine") or {}
    raw = retrieval.get("raw/euclidean")
    lead = "The raw pooled features ranked by Euclidean distance are where the two differ"
    if not isinstance(raw, Mapping):
        raw_text = f"{lead}; this run has no raw/euclidean row to measure it."
    else:
        pairs = {name: (to_float(raw.get(name)), to_float(unit.get(name))) for name in ("MAP@R", "P@1")}
        parts = [p for p in (_delta_phrase(name, *pair) for name, pair in pairs.items()) if p]
        if not parts:
            raw_text = (f"{lead}; here neither raw/euclidean nor unit/cosine has a score to compare "
                        "(no query could be scored).")
        else:
            deltas = {name: r - u for name, (r, u) in pairs.items() if r is not None and u is not None}
            counts = [to_float(row.get("n_queries_evaluated")) for row in (raw, unit)]
            counts = [c for c in counts if c is not None]
            verdict = normalising_verdict(deltas, min(counts) if counts else None)
            raw_text = f"{lead}, since their norms vary: " + "; ".join(parts) + f" — {verdict}."
    return {"rule": rule, "check": check, "status": status, "raw": raw_text, "sample": query_sample_text(metrics)}


def without_positive(retrieval: Mapping) -> str:
    """One sentence on queries that had nothing to find, said once when every variant agrees."""
    order = [v for v in ("unit/cosine", "unit/euclidean", "raw/euclidean") if v in retrieval]
    order += [v for v in retrieval if v not in order]
    counts = {}
    for v in order:
        n = to_float(get(retrieval, v, "n_queries_without_positive"))
        if n:
            counts[v] = (int(n), to_float(get(retrieval, v, "n_queries_evaluated")))
    if not counts:
        return ""

    def say(n: int, evaluated: float | None) -> str:
        one = n == 1
        text = (f"{n:,} quer{'y' if one else 'ies'} had no positive in the gallery and "
                f"{'was' if one else 'were'} left out")
        return text + (f" ({int(evaluated):,} evaluated)" if evaluated is not None else "")

    if len(set(counts.values())) == 1:
        return say(*next(iter(counts.values()))) + "."
    return " ".join(f"{v}: {say(*c)}." for v, c in counts.items())


def scoring_note(query_labels: np.ndarray, gallery_labels: np.ndarray, n_relevant: np.ndarray,
                 leave_one_out: bool, query_split: str) -> str | None:
    """Why there is nothing to score, or why the scores are trivial; None when the scores mean something."""
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    if len(query_labels) and not np.any(np.asarray(n_relevant) > 0):
        gallery_classes, sizes = np.unique(gallery_labels, return_counts=True)
        size_of = dict(zip(gallery_classes.tolist(), sizes.tolist()))
        query_classes = np.unique(query_labels).tolist()
        absent = [c for c in query_classes if c not in size_of]
        single = [c for c in query_classes if c in size_of and leave_one_out and size_of[c] == 1]
        head = "nothing to score: no query has a positive in the gallery"
        if len(single) == len(query_classes):
            return f"{head}: every {query_split} class has a single image"
        if len(absent) == len(query_classes):
            return f"{head}: none of the {query_split} classes appears in the gallery"
        parts = []
        if single:
            parts.append(f"{len(single)} {query_split} class{'es have' if len(single) != 1 else ' has'} a single image")
        if absent:
            parts.append(f"{len(absent)} {'do' if len(absent) != 1 else 'does'} not appear in the gallery")
        return f"{head}: " + " and ".join(parts) if parts else head
    if len(query_labels) and len(np.unique(np.concatenate([query_labels, gallery_labels]))) == 1:
        return ("only one class: every neighbour of every query is a positive, so the scores are trivially "
                "perfect and say nothing about the embedding")
    return None


# --------------------------------------------------------------------------- phase 2: diagnostics

def diagnostics_reading(unit: Mapping | None, raw: Mapping | None) -> str:
    """One plain-language sentence from the diagnostics numbers (unit vectors first, raw as fallback)."""
    unit = unit or {}
    raw = raw or {}

    def pick(key: str) -> float | None:
        value = to_float(unit.get(key))
        return value if value is not None else to_float(raw.get(key))

    parts = []
    cos = pick("mean_pairwise_cosine")
    if cos is not None:
        if cos > 0.5:
            parts.append(f"anisotropic: the vectors fill a narrow cone (mean pairwise cosine {cos:.2f}), so all "
                         f"cosines are high")
        elif cos >= 0.1:
            parts.append(f"moderately concentrated directions (mean pairwise cosine {cos:.2f})")
        elif cos > -0.1:
            parts.append(f"spread out in all directions (mean pairwise cosine {cos:.2f})")
        else:
            parts.append(f"vectors point away from each other (mean pairwise cosine {cos:.2f})")

    rank, dim, n = pick("effective_rank"), pick("dim"), pick("n")
    if rank is not None and dim:
        share = rank / dim
        if n is not None and n - 1 < dim:
            # n centred vectors span at most n - 1 dimensions: a low rank here is the sample, not the space.
            parts.append(f"effective rank {rank:.0f} of {dim:.0f} dimensions ({share:.0%}; at most "
                         f"{max(n - 1, 0):.0f} with {n:.0f} vectors, so it cannot tell how many the space uses)")
        else:
            tail = (", few dimensions really used" if share < 0.25
                    else ", most dimensions used" if share > 0.6 else "")
            parts.append(f"effective rank {rank:.0f} of {dim:.0f} dimensions ({share:.0%}){tail}")

    ratio = pick("intra_inter_distance_ratio")
    if ratio is not None:
        if ratio < 0.8:
            parts.append(f"clear class structure (intra/inter distance ratio {ratio:.2f})")
        elif ratio < 0.95:
            parts.append(f"weak class structure (intra/inter distance ratio {ratio:.2f})")
        else:
            parts.append(f"almost no class structure (intra/inter distance ratio {ratio:.2f})")

    skew = pick("hubness_skew")
    if skew is not None:
        if skew > 1:
            parts.append(f"strong hubness (skew {skew:.2f}): a few items crowd many neighbour lists")
        elif skew > 0.5:
            parts.append(f"moderate hubness (skew {skew:.2f})")
        else:
            parts.append(f"little hubness (skew {skew:.2f})")

    norm_mean, norm_std = to_float(get(raw, "norm", "mean")), to_float(get(raw, "norm", "std"))
    if norm_mean and norm_std is not None:
        cv = norm_std / norm_mean
        if cv > 0.2:
            parts.append(f"raw norms vary a lot (mean {fmt_magnitude(norm_mean)}, std {fmt_magnitude(norm_std)}: "
                         f"std/mean {cv:.2f})")

    if not parts:
        return ""
    sentence = "; ".join(parts) + "."
    if too_few(n):
        sentence = f"On only {n:.0f} vectors these diagnostics are rough. " + sentence[0].upper() + sentence[1:]
    return sentence[0].upper() + sentence[1:]


# --------------------------------------------------------------------------- phase 5: before vs after training

def anisotropy_change(before: Mapping, after: Mapping) -> dict:
    """How a trained model's space differs from the pretrained one, on the two axes that are easy to confuse.

    A narrow cone (high mean pairwise cosine) and dimensional collapse (low effective rank) are different
    failures: training can open the cone while squeezing the vectors into a few dimensions, which is a
    narrower space, not a more isotropic one. The verdict is "yes" only when one axis improved and neither
    got worse, "mixed" when they disagree, and "no" when neither improved.
    """
    cos_before, cos_after = to_float(before.get("mean_pairwise_cosine")), to_float(after.get("mean_pairwise_cosine"))
    rank_before, rank_after = to_float(before.get("effective_rank")), to_float(after.get("effective_rank"))
    better, worse = [], []
    if cos_before is not None and cos_after is not None:
        if cos_after < cos_before - COSINE_CHANGE:
            better.append("wider cone")
        elif cos_after > cos_before + COSINE_CHANGE:
            worse.append("narrower cone")
    if rank_before is not None and rank_after is not None and rank_before > 0:
        if rank_after < rank_before * (1 - RANK_CHANGE):
            worse.append("dimensional collapse")
        elif rank_after > rank_before * (1 + RANK_CHANGE):
            better.append("more dimensions used")
    verdict = "yes" if better and not worse else ("mixed" if better else "no")
    return {"verdict": verdict, "better": better, "worse": worse}


# --------------------------------------------------------------------------- phase 2: text ↔ image

def versus_chance(what: str, value: Any, chance: float, n: Any, chance_reason: str) -> str:
    """Whether a hit rate measured on `n` queries differs from what a random ranking scores (`chance`): by more
    than two standard errors of a binomial at the chance rate, or not; too few queries conclude nothing."""
    value, n = to_float(value), to_float(n)
    if value is None or not n:
        return ""
    head = f"{what} is {fmt(value)} on {int(n):,} quer{'y' if int(n) == 1 else 'ies'}, against {chance:.3f} " \
           f"by chance ({chance_reason})"
    if too_few(n):
        return f"{head}: too few queries to conclude (at least {MIN_QUERIES_TO_CONCLUDE} are needed)."
    error = float(np.sqrt(chance * (1 - chance) / n))
    if value > chance + 2 * error:
        verdict = "above chance"
    elif value < chance - 2 * error:
        verdict = "below chance"
    else:
        return f"{head}: not distinguishable from chance (within two standard errors, {2 * error:.3f})."
    return f"{head}: {verdict} by more than two standard errors ({2 * error:.3f})."


# --------------------------------------------------------------------------- phase 2: originals and versions

def auc_reading(baseline: str, auc: Mapping, n_groups: Any, subject: str = "versions") -> str:
    """Whether `subject` (versions) are closer to their originals than `baseline` pairs are to each other: only when
    the bootstrap interval of the AUC lies entirely above 0.5 (below: further); too few groups conclude nothing."""
    value, n = to_float(auc.get("auc")), to_float(n_groups)
    if value is None or not n:
        return ""
    low, high = (to_float(v) for v in (list(auc.get("ci95") or []) + [None, None])[:2])
    interval = f", 95 % bootstrap interval {fmt(low)}–{fmt(high)}" if low is not None and high is not None else ""
    head = f"{subject[:1].upper() + subject[1:]} vs {baseline}: AUC {fmt(value)} ({int(n):,} groups{interval})"
    if too_few(n):
        return f"{head}: too few groups to conclude (at least {MIN_QUERIES_TO_CONCLUDE} are needed)."
    if low is None or high is None:
        return f"{head}: no interval could be estimated, so no conclusion is drawn."
    if low > 0.5:
        return f"{head}: {subject} are closer to their originals than {baseline} are to each other."
    if high < 0.5:
        return f"{head}: {subject} are further from their originals than {baseline} are from each other."
    return f"{head}: the similarity does not tell {subject} from {baseline} (the interval contains 0.5)."


def difference_reading(what: str, a: str, b: str, first: Mapping, second: Mapping) -> str:
    """Whether the mean of sample `first` (named a) differs from `second` (named b) by more than two standard
    errors of the difference; each mapping holds "n", "mean", "std"."""
    n1, n2 = to_float(first.get("n")), to_float(second.get("n"))
    m1, m2 = to_float(first.get("mean")), to_float(second.get("mean"))
    s1, s2 = to_float(first.get("std")), to_float(second.get("std"))
    if None in (n1, n2, m1, m2, s1, s2) or min(n1, n2) < 2:
        return ""
    head = f"Mean {what}: {a} {fmt(m1)} (n = {int(n1):,}) vs {b} {fmt(m2)} (n = {int(n2):,})"
    if too_few(min(n1, n2)):
        return f"{head}: too few to conclude (at least {MIN_QUERIES_TO_CONCLUDE} of each are needed)."
    error = float(np.sqrt(s1 ** 2 / (n1 - 1) + s2 ** 2 / (n2 - 1)))
    if abs(m1 - m2) > 2 * error:
        closer, further = (a, b) if m1 > m2 else (b, a)
        return f"{head}: {closer} higher than {further} by more than two standard errors ({2 * error:.3f})."
    return f"{head}: no difference beyond two standard errors ({2 * error:.3f})."


def _rerank_p1_change(base: Mapping, row: Mapping) -> str | None:
    before, after = to_float(base.get("P@1")), to_float(row.get("P@1"))
    if before is None or after is None:      # to_float gives None for NaN too
        return None
    name = "the filter" if row.get("mode") == "filter" else f"a boost of {to_float(row.get('boost')):g}"
    if abs(after - before) < 0.0005:
        return f"{name} leaves P@1 at {before:.3f}"
    return f"{name} {'raises' if after > before else 'lowers'} P@1 from {before:.3f} to {after:.3f}"


def rerank_reading(rerank: Mapping) -> str:
    """What the table says: each mode's P@1 change, and why MAP@R is not the fair comparison here."""
    rows = [r for r in rerank.get("rows") or [] if isinstance(r, Mapping)]
    changes = [c for c in (_rerank_p1_change(rows[0], r) for r in rows[1:]) if c] if rows else []
    if not changes:
        return "No query could be scored, so re-ranking's effect is not measured."
    sentence = "; ".join(changes)
    accuracy = to_float(rerank.get("vote_accuracy")) or 0.0
    return (f"{sentence[0].upper()}{sentence[1:]}. The category vote of {rerank.get('vote_k')} neighbours is right "
            f"for {accuracy:.1%} of the queries. Relevance here is the very label the vote predicts, so with the "
            "filter MAP@R mostly measures the vote's accuracy: P@1 is the fair comparison, and a finer relevance "
            "(product identity) is where a wrong vote costs more than it gains.")
