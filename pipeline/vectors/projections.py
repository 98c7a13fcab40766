"""2-D projections of an embedding space for pictures, and the sample they are drawn on.

t-SNE and UMAP are quadratic-ish and stochastic, so callers project a stratified
sample (`stratified_sample`) and pass a seed; PCA is exact and cheap.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from pipeline.core.cpus import available_cores

METHODS = ("pca", "tsne", "umap")
DISPLAY_NAMES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}

# Below these sizes the neighbour-graph methods are ill-posed (perplexity or
# n_neighbors would be < 1, spectral init has too few eigenvectors), so fall back
# to PCA rather than fail the whole evaluation over a tiny split.
_MIN_POINTS_TSNE = 5
_MIN_POINTS_UMAP = 6

# What a picture needs to say anything (`plan_projections`). t-SNE and UMAP lay out neighbourhoods: with
# fewer points than their default neighbourhood sizes (perplexity 30, 15 neighbours) every point is
# everyone's neighbour, and with one class there is no structure to show; they cost seconds (UMAP's
# import alone) for a picture of noise. PCA is exact and cheap, so it only needs a handful of points.
MIN_POINTS_PCA = 5
MIN_POINTS_NEIGHBOUR_LAYOUT = 50
MIN_CLASSES_NEIGHBOUR_LAYOUT = 2


def _as_2d_float(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"expected an (n, d) array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("embeddings contain NaN or inf")
    return x


def _pad_to_2(y: np.ndarray, n: int) -> np.ndarray:
    # One-dimensional inputs (or rank-1 data) still get an (n, 2) answer so the
    # plotting code never has to special-case them.
    if y.shape[1] < 2:
        y = np.hstack([y, np.zeros((n, 2 - y.shape[1]))])
    return y


def _pca(x: np.ndarray) -> np.ndarray:
    n = len(x)
    centred = x - x.mean(axis=0, keepdims=True)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(2, len(s))
    # SVD signs are arbitrary; fix them (largest loading positive) so the same
    # data gives the same picture across runs and machines.
    signs = np.sign(vt[:k][np.arange(k), np.argmax(np.abs(vt[:k]), axis=1)])
    signs[signs == 0] = 1.0
    y = u[:, :k] * s[:k] * signs
    return _pad_to_2(y, n)


def _has_zero_rows(x: np.ndarray) -> bool:
    return bool(np.any(np.linalg.norm(x, axis=1) <= 1e-12))


class CollapsedEmbeddingError(ValueError):
    """All points (nearly) coincide: there is no structure to lay out."""


def _check_not_collapsed(x: np.ndarray, rtol: float = 1e-5) -> None:
    # Points that agree to float rounding are not "duplicates" to t-SNE's Barnes-Hut
    # tree, which then subdivides them down to the last bit and overflows the stack
    # (a segmentation fault, not an exception). A collapsed model produces exactly that.
    spread = float(np.max(np.abs(x - x.mean(axis=0, keepdims=True))))
    scale = float(np.max(np.abs(x))) or 1.0
    if spread <= rtol * scale:
        raise CollapsedEmbeddingError(
            f"all {len(x)} points coincide (spread {spread:.1e}): the embedding has collapsed, nothing to lay out")


def _tsne(x: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    n = len(x)
    # Cosine is the geometry the retrieval uses, but it is undefined for zero
    # vectors and meaningless in one dimension; use euclidean there.
    metric = "euclidean" if (x.shape[1] < 2 or _has_zero_rows(x)) else "cosine"
    tsne = TSNE(
        n_components=2,
        perplexity=min(30.0, (n - 1) / 3.0),
        init="pca",
        learning_rate="auto",
        metric=metric,
        # 500 iterations (250 of them early exaggeration) gives stable cluster
        # layouts at roughly half the cost of the default 1000.
        max_iter=500,
        random_state=seed,
    )
    return tsne.fit_transform(x)


def _import_umap():
    """umap, without the TensorFlow import it attempts for its optional ParametricUMAP.

    In the projection worker process nothing else needs TensorFlow, and importing it cost 6.5 of umap's
    9.4 s import; a blocked import makes umap skip ParametricUMAP, which is never used here.
    """
    if "tensorflow" in sys.modules:
        with _cached_numba_compilation():
            import umap
        return umap
    sys.modules["tensorflow"] = None  # type: ignore[assignment]  # `import tensorflow` now raises ImportError
    try:
        with warnings.catch_warnings(), _cached_numba_compilation():
            warnings.simplefilter("ignore", ImportWarning)
            import umap
    finally:
        del sys.modules["tensorflow"]
    return umap


def numba_cache_dir() -> Path:
    """Where numba keeps the compiled code of umap and pynndescent: $NUMBA_CACHE_DIR, else
    $EMBEDLAB_CACHE/numba (default ~/.cache/embedlab/numba)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    return Path(os.environ.get("EMBEDLAB_CACHE") or "~/.cache/embedlab").expanduser() / "numba"


@contextlib.contextmanager
def _cached_numba_compilation():
    """While umap is imported, numba's jit decorators default to cache=True.

    umap and pynndescent declare most of their numba functions without it, so every new process compiled them
    again: 20 of UMAP's 35 s on 2,000 CIFAR-10 points, each phase 2 (BENCHMARKS 18). Cached, a later process
    loads the machine code from `numba_cache_dir()` (numba checks it against the source files). Functions numba
    cannot cache are compiled as before. Only the import is affected: the decorators are restored after it.
    """
    if "umap" in sys.modules:
        yield
        return
    directory = numba_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home: compile every time, as before
        yield
        return
    import numba

    numba.config.CACHE_DIR = str(directory)
    originals = numba.njit, numba.jit

    def caching(decorator):
        def decorate(*args, **kwargs):
            kwargs.setdefault("cache", True)
            return decorator(*args, **kwargs)
        return decorate

    numba.njit, numba.jit = caching(numba.njit), caching(numba.jit)
    try:
        yield
    finally:
        numba.njit, numba.jit = originals


def _umap(x: np.ndarray, seed: int) -> np.ndarray:
    umap = _import_umap()

    n = len(x)
    metric = "euclidean" if _has_zero_rows(x) else "cosine"
    with warnings.catch_warnings():
        # A fixed random_state forces single-threaded fitting and umap warns
        # about it every call; that trade (reproducibility) is intended.
        warnings.filterwarnings("ignore", message=".*n_jobs.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*random_state.*", category=UserWarning)
        # Functions numba cannot cache (see _cached_numba_compilation) are compiled each time, as before.
        warnings.filterwarnings("ignore", message=".*[Cc]annot cache.*")
        reducer = umap.UMAP(
            n_components=2,
            n_neighbors=min(15, n - 1),
            min_dist=0.1,
            metric=metric,
            random_state=seed,
            n_jobs=1,
        )
        return reducer.fit_transform(x)


def project_2d(x: np.ndarray, method: str, *, seed: int = 0) -> np.ndarray:
    """Project (n, d) vectors to (n, 2) float32 with "pca", "tsne" or "umap"."""
    method = method.lower().replace("-", "")
    if method not in METHODS:
        raise ValueError(f"unknown projection method {method!r}; expected one of {METHODS}")
    x = _as_2d_float(x)
    n = len(x)
    if n == 0:
        return np.zeros((0, 2), dtype=np.float32)
    if n == 1:
        return np.zeros((1, 2), dtype=np.float32)

    if method in ("tsne", "umap") and n >= _MIN_POINTS_TSNE:
        _check_not_collapsed(x)
    if method == "tsne" and n >= _MIN_POINTS_TSNE:
        y = _tsne(x, seed)
    elif method == "umap" and n >= _MIN_POINTS_UMAP:
        y = _umap(x, seed)
    else:
        y = _pca(x)

    y = np.asarray(y, dtype=np.float32)
    if not np.all(np.isfinite(y)):
        raise FloatingPointError(f"{method} projection produced non-finite coordinates")
    return y


def stratified_sample(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of about `n` items, proportional per class, every class kept when n allows.

    Returns all indices when n >= len(labels). When n is smaller than the number
    of classes, n random classes contribute one item each.
    """
    labels = np.asarray(labels)
    total = len(labels)
    if n >= total:
        return np.arange(total)
    if n <= 0:
        return np.zeros(0, dtype=np.int64)

    rng = np.random.default_rng(seed)
    classes, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.ravel()
    counts = np.bincount(inverse, minlength=len(classes))

    if n < len(classes):
        chosen = rng.choice(len(classes), size=n, replace=False)
        quotas = np.zeros(len(classes), dtype=np.int64)
        quotas[chosen] = 1
    else:
        target = n * counts / total
        quotas = np.minimum(counts, np.maximum(1, np.floor(target).astype(np.int64)))
        # The floor-with-minimum-one allocation can miss n by up to the number of
        # classes either way; settle the difference where it distorts
        # proportions least.
        while quotas.sum() < n:
            room = np.where(quotas < counts, target - quotas, -np.inf)
            quotas[int(np.argmax(room))] += 1
        while quotas.sum() > n:
            excess = np.where(quotas > 1, quotas - target, -np.inf)
            quotas[int(np.argmax(excess))] -= 1

    picked = []
    for c, q in enumerate(quotas):
        if q:
            members = np.flatnonzero(inverse == c)
            picked.append(rng.choice(members, size=int(q), replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64)


def sample_rows(rows: np.ndarray, labels: np.ndarray, limit: int, seed: int) -> tuple[np.ndarray, dict | None]:
    """(rows to use, how they were drawn): all of `rows` and None when limit is 0 or not below their number,
    else a class-stratified sample of `limit` seeded by `seed` (labels indexed by row) and its description."""
    if limit == 0 or limit >= len(rows):
        return rows, None
    chosen = rows[stratified_sample(labels[rows], limit, seed=seed)]
    return chosen, {"max_queries": limit, "n_available": int(len(rows)), "n_sampled": int(len(chosen)),
                    "method": "stratified by class", "seed": seed, "n_classes": int(len(np.unique(labels[rows])))}


def plan_projections(methods: list[str], n_points: int, n_classes: int) -> tuple[list[str], dict[str, str]]:
    """(the methods worth running on this sample, {display name: why it is skipped}).

    Plot cost follows the data: a projection that cannot show anything at this size is not computed.
    """
    run, skipped = [], {}
    for method in methods:
        name = DISPLAY_NAMES.get(method, method)
        if method == "pca":
            if n_points < MIN_POINTS_PCA:
                skipped[name] = f"only {n_points} points (PCA is drawn from {MIN_POINTS_PCA})"
                continue
        elif n_points < MIN_POINTS_NEIGHBOUR_LAYOUT:
            skipped[name] = (f"only {n_points} points: {name} lays out neighbourhoods and needs at least "
                             f"{MIN_POINTS_NEIGHBOUR_LAYOUT} to show any")
            continue
        elif n_classes < MIN_CLASSES_NEIGHBOUR_LAYOUT:
            skipped[name] = f"{n_classes} class among the points: no class structure to lay out"
            continue
        run.append(method)
    return run, skipped


def project_all(x: np.ndarray, methods: list[str], seed: int = 0) -> dict[str, np.ndarray | str]:
    """Every requested projection, keyed by display name; a failure becomes its message."""
    out: dict[str, np.ndarray | str] = {}
    for method in methods:
        try:
            out[DISPLAY_NAMES[method]] = project_2d(x, method, seed=seed)
        except Exception as exc:  # one projection failing must not sink the others
            out[DISPLAY_NAMES.get(method, method)] = f"{type(exc).__name__}: {exc}"
    return out


def _cores() -> int:
    return available_cores()


def _project_with_threads(x: np.ndarray, methods: list[str], seed: int, threads: int) -> dict:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads):
        return project_all(x, methods, seed)


class BackgroundProjections:
    """Compute projections in separate processes while the caller does other work.

    t-SNE and UMAP take seconds each, mostly on one core; each runs in a process of its own (the two fit at
    once on two cores: BENCHMARKS 18 measured the pair in one process as the critical path of phase 2 once
    retrieval was done), beside the single-threaded rest of phase 2. The processes share the cores: the
    workers' BLAS/OpenMP pools split all cores but one (t-SNE's gradient would otherwise take every core), and
    `sharing_cores()` gives the caller's the rest while a worker runs (oversubscribed pools spin and slow all).
    PCA takes milliseconds and is computed in-line when the result is asked for.
    """

    def __init__(self, x: np.ndarray, methods: list[str], seed: int = 0):
        import concurrent.futures
        import multiprocessing

        self._executor = None
        self._inline = (x, methods, seed)
        self._futures: dict = {}
        slow = [m for m in methods if m != "pca"]
        if not slow:
            return  # a process (a new interpreter and its imports) would cost seconds
        threads = max(1, (_cores() - 1) // len(slow))
        try:
            # spawn: forking a process that already runs TensorFlow threads can deadlock.
            self._executor = concurrent.futures.ProcessPoolExecutor(
                max_workers=len(slow), mp_context=multiprocessing.get_context("spawn"))
            self._futures = {m: self._executor.submit(_project_with_threads, x, [m], seed, threads) for m in slow}
        except Exception:  # no process support (sandbox): compute in-line when asked
            self._futures = {}

    def sharing_cores(self):
        """A context in which the caller's BLAS/OpenMP pools leave the workers their cores (while any runs)."""
        if all(f.done() for f in self._futures.values()):
            return contextlib.nullcontext()
        from threadpoolctl import threadpool_limits

        return threadpool_limits(limits=max(1, _cores() - 1))

    def result(self) -> dict[str, np.ndarray | str]:
        x, methods, seed = self._inline
        try:
            out: dict[str, np.ndarray | str] = {}
            for method in methods:
                name = DISPLAY_NAMES[method]
                future = self._futures.get(method)
                if future is None:
                    out.update(project_all(x, [method], seed))
                    continue
                try:
                    out.update(future.result())
                except Exception as exc:
                    # The worker died: killed for memory, or a crash inside t-SNE/UMAP's native code. Either
                    # would take this process down too if rerun here, so the method reports the failure.
                    out[name] = f"the projection process died ({type(exc).__name__}: {exc}); not computed"
            return out
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
