"""lm-eval's provenance lookups, made silent where there is no git repository and run once per process.

Why: ``lm_eval.simple_evaluate`` (0.4.x) records ``git describe --always`` of the *current directory*
with ``subprocess.check_output`` and no stderr redirection, so every evaluation outside a git checkout
prints "fatal: not a git repository" on the terminal (four times per smoke study). The harness records
its own provenance (``harness.tracking``); lm-eval's is kept, only its error text is dropped.

It also records the environment (``add_env_info``: torch's ``collect_env``, which runs ``pip list`` and
other subprocesses) in every evaluation: 0.66 s each on two CPU cores, 4 s of the quickstart's six
evaluations. The environment does not change within a process: it is looked up once and reused.

Written against lm-eval 0.4.13 (``lm_eval.evaluator.get_git_commit_hash`` and ``add_env_info``); if a
name disappears the function leaves that lookup alone.
"""

from __future__ import annotations

import subprocess

__all__ = ["quiet_git_commit_hash", "silence_lm_eval_git"]

_ENV_INFO: dict | None = None


def quiet_git_commit_hash() -> str | None:
    """``git describe --always`` of the current directory, or None (without a word) when there is none."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def silence_lm_eval_git() -> None:
    """Replace lm-eval's git lookup by :func:`quiet_git_commit_hash`, and its environment lookup by one that
    runs once per process (idempotent)."""
    try:
        import lm_eval.evaluator as evaluator
    except ImportError:
        return
    if hasattr(evaluator, "get_git_commit_hash"):
        evaluator.get_git_commit_hash = quiet_git_commit_hash
    original = getattr(evaluator, "add_env_info", None)
    if original is not None and not getattr(original, "_once_per_process", False):

        def add_env_info(storage: dict) -> None:
            global _ENV_INFO
            if _ENV_INFO is None:
                found: dict = {}
                original(found)
                _ENV_INFO = found
            storage.update(_ENV_INFO)

        add_env_info._once_per_process = True  # type: ignore[attr-defined]
        evaluator.add_env_info = add_env_info
