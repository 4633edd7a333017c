"""How many worker processes a run may start, and a worker that never outlives its parent.

Why: every worker imports torch and loads its own model copy. ``--workers 1000`` on a 4-point CPU study
once started hundreds of such processes, the OOM killer fired, the parent died with exit 137 and ~340
orphaned workers kept 24 GB. So:

- :func:`device_cap` bounds the workers by what the machine can hold: the GPUs (one trial per
  ``gpus_per_trial`` GPUs) or, on a CPU, the cores and the available memory divided by a worker's
  resident size (:data:`CPU_WORKER_GIB`, measured: ~0.7 GiB for the tiny test model, ~2 GiB with
  SmolLM2-135M's student, teacher and base copies);
- :func:`points_cap` bounds them by the trials left to run (a worker without a trial only costs);
- :func:`run_child` is a spawned worker's entry: it calls :func:`die_with_parent` before it unpickles
  (hence imports) the real target, so a parent killed while its workers still import torch (tens of
  seconds on a loaded machine) leaves none behind either;
- :func:`die_with_parent` asks the kernel to send SIGTERM to the worker
  when its parent dies (``prctl(PR_SET_PDEATHSIG)``, Linux), and starts a watchdog thread that does the
  same where prctl is unavailable (and kills the worker for good if SIGTERM did not end it in
  :data:`GRACE_S` seconds). SIGTERM, not SIGKILL: the worker marks its running trial interrupted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pickle
import signal
import sys
import threading
import time

__all__ = [
    "CPU_WORKER_GIB",
    "GRACE_S",
    "clamp_message",
    "device_cap",
    "die_with_parent",
    "points_cap",
    "run_child",
]

CPU_WORKER_GIB = 2.0
GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1


def device_cap(device: str | None, gpus_per_trial: int = 1) -> tuple[int, str]:
    """The most workers this machine can run at once, and why (for the clamp message)."""
    on_gpu = device != "cpu" and device != "mps" and _cuda_count() > 0
    if on_gpu:
        count = _cuda_count()
        return max(1, count // gpus_per_trial), f"{count} GPU(s) / {gpus_per_trial} per trial"
    cores = os.cpu_count() or 1
    available = _available_gib()
    by_memory = max(1, int(available // CPU_WORKER_GIB))
    why = f"{cores} CPU core(s), {available:.0f} GiB available / {CPU_WORKER_GIB:g} GiB per worker"
    return max(1, min(cores, by_memory)), why


def points_cap(points_left: int | None) -> int:
    """At most one worker per trial left (None: unbounded search, any number)."""
    return sys.maxsize if points_left is None else max(1, points_left)


def clamp_message(requested: int, granted: int, reason: str) -> str:
    return f"--workers {requested} clamped to {granted} ({reason})"


def _cuda_count() -> int:
    if "torch" not in sys.modules and os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _available_gib() -> float:
    try:
        import psutil

        return psutil.virtual_memory().available / 2**30
    except Exception:  # noqa: BLE001 - no psutil or no /proc: assume one worker's worth
        return CPU_WORKER_GIB


def die_with_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` (its parent) dies; see the module docstring."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still holds
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(target=_watchdog, args=(parent_pid,), name="parent-watchdog", daemon=True).start()


def _watchdog(parent_pid: int, interval: float = 0.5) -> None:
    while os.getppid() == parent_pid:
        time.sleep(interval)
    os.kill(os.getpid(), signal.SIGTERM)  # orphaned: re-parented to init or a subreaper
    time.sleep(GRACE_S)
    os._exit(137)


def run_child(parent_pid: int, payload: bytes) -> None:
    """Entry of a spawned worker: die with ``parent_pid`` first, then run ``pickle.loads(payload)``, a
    ``(function, args)`` pair. The payload is pickled by the parent so that unpickling this process's
    arguments imports nothing heavier than this module."""
    die_with_parent(parent_pid)
    function, args = pickle.loads(payload)
    function(*args)
