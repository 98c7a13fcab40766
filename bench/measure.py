"""Run a command and report its wall time and the peak RSS of its whole process tree.

    python bench/measure.py --label phase2 --json out.json -- python run.py phase2 ...

The tree matters: phase 0 decodes in worker processes, so the parent's own peak
(what getrusage reports) would understate it. RSS is sampled every 50 ms.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

import psutil


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def measure(cmd: list[str], interval: float = 0.05, env=None) -> dict:
    started = time.perf_counter()
    child = subprocess.Popen(cmd, env=env)
    proc = psutil.Process(child.pid)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            try:
                peak = max(peak, tree_rss(proc))
            except psutil.NoSuchProcess:
                return
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = child.wait()
    done.set()
    sampler.join()
    return {"returncode": code, "wall_s": time.perf_counter() - started, "peak_rss_mb": peak / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", default="")
    parser.add_argument("--json", help="append the result as one JSON line to this file")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    result = {"label": args.label, "cmd": " ".join(cmd), **measure(cmd)}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result["returncode"]


if __name__ == "__main__":
    sys.exit(main())
