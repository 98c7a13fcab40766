"""The bundle a server answers from, swapped for a newer version without dropping a request.

`B/CURRENT` names the bundle version in force (pipeline.serving.bundle writes a new version
beside the old and swaps CURRENT atomically). A request asks `LiveBundle.current()`; at most
every `check_interval_s` that call reads CURRENT (a few bytes), and when it names another
version a background thread loads it (model and index: seconds) while every request keeps
getting the old `Searcher`. The new one replaces it in one reference assignment once it is
fully loaded, so a request sees either version whole, never a mix. A version that fails to load
is logged and reported by /health; the old one keeps serving, and the failed version is not
retried until CURRENT changes again.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

log = logging.getLogger("embedlab.serve")


@dataclass(frozen=True)
class Loaded:
    """One loaded version: what CURRENT said when it was read, and the searcher built from it."""

    marker: str
    searcher: Any
    loaded_at: float


def read_marker(root: Path) -> str:
    """The content of CURRENT ('' for a bundle folder without one, which then never changes)."""
    try:
        return (root / "CURRENT").read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return ""


class LiveBundle:
    """Holds the searcher in force; `load(root) -> searcher` builds one (Searcher(open_bundle(root)))."""

    def __init__(self, root: str | Path, load: Callable[[Path], Any], check_interval_s: float = 0.5):
        self.root = Path(root)
        self.check_interval_s = check_interval_s
        self._load = load
        marker = read_marker(self.root)
        self._loaded = Loaded(marker, load(self.root), time.time())   # the first load fails loudly
        self._lock = threading.Lock()
        self._checked_at = time.monotonic()
        self._loading: str | None = None
        self._failed: str | None = None
        self.last_error: str | None = None

    @property
    def loaded(self) -> Loaded:
        return self._loaded

    def current(self) -> Any:
        """The searcher to answer this request with; starts a reload when CURRENT has changed."""
        now = time.monotonic()
        if now - self._checked_at >= self.check_interval_s:
            self._checked_at = now
            self._maybe_reload()
        return self._loaded.searcher

    def reload_now(self) -> Loaded:
        """Load what CURRENT names, in this thread (after a write through this server's own API)."""
        marker = read_marker(self.root)
        if marker != self._loaded.marker:
            self._swap_in(marker)
        return self._loaded

    def _maybe_reload(self) -> None:
        try:
            marker = read_marker(self.root)
        except OSError as exc:   # a CURRENT being replaced, or unreadable: keep serving, look again later
            log.warning("serve: cannot read %s/CURRENT (%s); still serving %s", self.root, exc, self._loaded.marker)
            return
        if marker in (self._loaded.marker, self._failed):
            return
        with self._lock:
            if self._loading is not None:
                return
            self._loading = marker
        threading.Thread(target=self._swap_in, args=(marker,), name="bundle-reload", daemon=True).start()

    def _swap_in(self, marker: str) -> None:
        started = time.perf_counter()
        try:
            # Should CURRENT move on during the load, the next check sees a marker other than
            # this one and loads again: one spare load, never a stale version kept.
            searcher = self._load(self.root)
            self._loaded = Loaded(marker, searcher, time.time())
            self._failed, self.last_error = None, None
            log.info("serve: now serving bundle %s (loaded in %.1f s)", marker, time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001 - a broken new version must not stop the old one serving
            self._failed = marker
            self.last_error = f"bundle version {marker!r} failed to load: {exc}"
            log.exception("serve: %s; still serving %s", self.last_error, self._loaded.marker)
        finally:
            with self._lock:
                self._loading = None
