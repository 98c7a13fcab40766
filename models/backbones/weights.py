"""Where a backbone's weights come from: Keras's cache, a download, or a file the user names.

Nothing here knows a backbone by name: a builder says which `WeightsFile` it needs, these
functions find it and load it, and every way that can fail ends in one
`WeightsUnavailableError` whose message names the file and where to put it.
"""
from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass
from pathlib import Path


class WeightsUnavailableError(RuntimeError):
    """Weights were asked for but cannot be had: not cached, not downloadable, or not loadable."""


@dataclass(frozen=True)
class WeightsFile:
    fname: str                    # the name Keras's cache knows it by
    url: str
    file_hash: str | None = None  # md5 or sha256 as keras.utils.get_file checks it


def keras_cache_dirs() -> list[Path]:
    """Where Keras's own `get_file` looks for cached weights, in its order."""
    import keras

    home = Path(os.path.expanduser(keras.config.keras_home() if hasattr(keras.config, "keras_home")
                                   else os.environ.get("KERAS_HOME", "~/.keras")))
    return [home / "models", Path("/tmp/.keras/models")]


def cached_weights(weights: WeightsFile) -> Path | None:
    """The cached copy of a weights file, or None when it has to be downloaded."""
    for folder in keras_cache_dirs():
        if (folder / weights.fname).is_file():
            return folder / weights.fname
    return None


def short_reason(exc: BaseException, width: int = 200) -> str:
    """An exception as one line for a message: its type and first line, shortened at a word boundary."""
    text = " ".join(str(exc).split()) or "no detail"
    return textwrap.shorten(f"{type(exc).__name__}: {text}", width=width, placeholder=" …")


def resolve_imagenet_weights(weights: WeightsFile, backbone: str) -> Path:
    """The local path of a backbone's pretrained weights: the Keras cache, else a download."""
    import keras

    cached = cached_weights(weights)
    if cached is not None:
        return cached
    try:
        return Path(keras.utils.get_file(weights.fname, weights.url, cache_subdir="models",
                                         file_hash=weights.file_hash))
    except Exception as exc:  # network down, 404, hash mismatch: all mean "not available"
        expected = keras_cache_dirs()[0] / weights.fname
        raise WeightsUnavailableError(
            f"pretrained weights for backbone {backbone!r} are not available: {weights.fname} is not in the Keras "
            f"cache and downloading it from {weights.url} failed ({short_reason(exc)}). Put the file at {expected} "
            f"(or set KERAS_HOME to a folder whose models/ holds it), or run with --weights none."
        ) from exc


def load_weights_file(model, path: str | Path, backbone: str) -> None:
    """`model.load_weights(path)`, with a file that is not this network's weights as one clear error."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file not found: {path}")
    try:
        model.load_weights(str(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # h5py: OSError for a file that is not HDF5; Keras: ValueError for another network's weights.
        raise WeightsUnavailableError(
            f"weights file {path} cannot be loaded into backbone {backbone!r} ({short_reason(exc)}): give a Keras "
            f"weights file (.weights.h5, .h5 or .keras) saved from this backbone with the same parameters, or "
            f"use --weights imagenet / none"
        ) from exc
