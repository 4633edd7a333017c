"""User-facing errors: one clear line, exit code 2, never a traceback."""

from __future__ import annotations

__all__ = ["HarnessError", "SpecError"]


class HarnessError(Exception):
    """Bad input or a missing resource a user can fix. The CLI prints ``str(err)`` and exits 2."""

    exit_code = 2


class SpecError(HarnessError):
    """A study spec is invalid. The message names the file, the YAML line, the field path and the reason."""
