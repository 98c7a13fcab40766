"""Every error a phase reports to the user as one line (the CLI prints it and exits non-zero).

Libraries raise these; `pipeline.runner.PHASE_ERRORS` is the tuple the CLI catches. An error
that is not listed here is a bug and keeps its traceback.
"""
from __future__ import annotations


class PhaseInputError(RuntimeError):
    """A phase cannot start because an earlier phase's artifacts are missing or stale."""


class IngestError(RuntimeError):
    """Phase 0 cannot produce a dataset (bad source, nothing valid to ingest...)."""


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; nothing was saved as a result."""


class ExportError(RuntimeError):
    """The composed model does not reproduce the embeddings it was trained to give."""


class BundleError(PhaseInputError, ValueError):
    """A bundle that is missing, corrupt, or cannot take the change asked of it (one line)."""
