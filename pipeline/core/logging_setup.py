"""One logging setup for the CLI: short lines on stderr, TensorFlow's start-up chatter quieted.

TensorFlow's C++ side logs through absl before absl is initialised, which no environment
variable silences: on a CPU-only machine every import prints that the CUDA drivers are
missing and that oneDNN is on, each twice (TensorFlow 2.21), and the first device query adds
a `failed call to cuInit` error. `import_tensorflow_quietly` imports TensorFlow and lists
its devices with the process's stderr captured, drops exactly those known lines (the cuInit
failure only where TensorFlow found no CUDA driver at all, i.e. on a CPU-only machine) and
passes everything else through, so real errors stay visible.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import warnings

# Informational lines TensorFlow prints on import; nothing the user can or needs to act on.
_IMPORT_NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine"
    r"|port\.cc:\d+\] oneDNN custom operations are on"
    r"|cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized to use available CPU instructions"
    r"|To enable the following instructions: .* in other operations, rebuild TensorFlow"
)
_NO_CUDA_DRIVER = re.compile(r"Could not find cuda drivers on your machine")
# On a machine without a CUDA driver this is the GPU probe failing, as expected; elsewhere it is a real error.
_CUINIT_FAILED = re.compile(r"cuda_platform\.cc:\d+\] failed call to cuInit")


def quiet_tensorflow_environment() -> None:
    """Environment TensorFlow reads when it is imported: its own INFO and WARNING lines off."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def setup_logging(verbose: bool = False) -> None:
    quiet_tensorflow_environment()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("tensorflow", "absl", "h5py", "matplotlib", "numba", "PIL", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow (and Keras) now, without its known start-up noise; other stderr output is kept."""
    if "tensorflow" in sys.modules:
        return
    quiet_tensorflow_environment()
    sys.stderr.flush()
    saved_fd = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import keras  # noqa: F401
            import tensorflow as tf

            # Physical devices only: no logical device or context is created, so a multi-worker
            # strategy can still be set up afterwards.
            tf.config.list_physical_devices("GPU")
        finally:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            captured.seek(0)
            output = captured.read().decode(errors="replace")
            cpu_only = bool(_NO_CUDA_DRIVER.search(output))
            kept = [line for line in output.splitlines() if line.strip() and not _IMPORT_NOISE.search(line)
                    and not (cpu_only and _CUINIT_FAILED.search(line))]
            if kept:
                print("\n".join(kept), file=sys.stderr)
