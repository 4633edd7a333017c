"""lm-eval's provenance lookup, made silent where there is no git repository.

Why: ``lm_eval.simple_evaluate`` (0.4.x) records ``git describe --always`` of the *current directory*
with ``subprocess.check_output`` and no stderr redirection, so every evaluation outside a git checkout
prints "fatal: not a git repository" on the terminal (four times per smoke study). The harness records
its own provenance (``harness.tracking``); lm-eval's is kept, only its error text is dropped.

Written against lm-eval 0.4.13 (``lm_eval.evaluator.get_git_commit_hash``); if that name disappears the
function leaves lm-eval alone.
"""

from __future__ import annotations

import subprocess

__all__ = ["quiet_git_commit_hash", "silence_lm_eval_git"]


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
    """Replace lm-eval's git lookup by :func:`quiet_git_commit_hash` (idempotent)."""
    try:
        import lm_eval.evaluator as evaluator
    except ImportError:
        return
    if hasattr(evaluator, "get_git_commit_hash"):
        evaluator.get_git_commit_hash = quiet_git_commit_hash
