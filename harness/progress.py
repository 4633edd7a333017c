"""Live progress of a study: trials done / total with an ETA, the current trial's steps and phase.

Why hooks and not a progress bar passed around: the runner, the trial and the trainer's callback each know
one piece (how many trials, which phase, which step), and a worker process has no terminal of its own.
``RichProgress`` draws a live display in the process that owns the terminal; ``LineProgress`` prints one
line per event (worker processes, logs, non-terminal output).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping

__all__ = ["LineProgress", "NullProgress", "RichProgress", "StudyProgress"]


class StudyProgress:
    """The hooks; the base class ignores them."""

    def study_start(self, total: int, done: int) -> None: ...

    def study_advance(self, done: int, total: int | None = None) -> None: ...

    def trial_start(self, number: int, variant: str) -> None: ...

    def trial_steps(self, total: int) -> None: ...

    def trial_step(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def trial_phase(self, text: str) -> None: ...

    def trial_progress(self, text: str, done: int, total: int | None) -> None:
        """Progress inside a phase (lm-eval's requests: ``"generating", 5, 8``); a display may skip it."""

    def trial_end(self, number: int, variant: str, state: str, seconds: float, detail: str = "") -> None: ...

    def message(self, text: str) -> None: ...

    def close(self) -> None: ...


NullProgress = StudyProgress


class LineProgress(StudyProgress):
    """One line per event on stderr, prefixed (e.g. by the worker id)."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self._last_step_print = 0.0
        self._trial = ""

    def _print(self, text: str) -> None:
        print(f"{self.prefix}{text}", file=sys.stderr, flush=True)

    def trial_start(self, number: int, variant: str) -> None:
        self._trial = f"trial {number} ({variant})"  # every line names its trial: workers interleave
        self._last_step_print = time.monotonic()
        self._print(f"{self._trial}: started")

    def trial_step(self, step: int, metrics: Mapping[str, float]) -> None:
        now = time.monotonic()
        if now - self._last_step_print >= 30:  # a line every 30 s at most: logs stay readable
            self._last_step_print = now
            loss = metrics.get("loss")
            self._print(f"{self._trial}: step {step}" + (f" loss {loss:.4g}" if loss is not None else ""))

    def trial_phase(self, text: str) -> None:
        if text.startswith("loading"):  # not an event a reader of the log needs; the display shows it
            return
        self._print(f"{self._trial}: {text}")

    def trial_end(self, number: int, variant: str, state: str, seconds: float, detail: str = "") -> None:
        self._print(
            f"trial {number} ({variant}): {state} in {seconds:.1f}s" + (f" {detail}" if detail else "")
        )

    def message(self, text: str) -> None:
        self._print(text)


class RichProgress(StudyProgress):
    """A rich live display: the study bar (done/total, elapsed, ETA) and the current trial's bar."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        self._study = self._progress.add_task("study", total=None, info="")
        self._trial = None
        self._progress.start()

    def study_start(self, total: int, done: int) -> None:
        self._progress.update(self._study, total=total, completed=done)

    def study_advance(self, done: int, total: int | None = None) -> None:
        self._progress.update(self._study, completed=done, **({"total": total} if total is not None else {}))

    def trial_start(self, number: int, variant: str) -> None:
        if self._trial is not None:
            self._progress.remove_task(self._trial)
        from rich.markup import escape

        self._trial = self._progress.add_task(f"trial {number} {escape(variant)}", total=None, info="loading")

    def trial_steps(self, total: int) -> None:
        if self._trial is not None:
            self._progress.update(self._trial, total=total, completed=0, info="training")

    def trial_step(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._trial is not None:
            loss = metrics.get("loss")
            info = f"loss {loss:.4g}" if loss is not None else "training"
            self._progress.update(self._trial, completed=step, info=info)

    def trial_phase(self, text: str) -> None:
        from rich.markup import escape

        if self._trial is not None:
            self._progress.update(self._trial, info=escape(text))

    def trial_progress(self, text: str, done: int, total: int | None) -> None:
        from rich.markup import escape

        if self._trial is not None:  # the trial's bar counts the phase's work: "evaluating: generating 5/8"
            self._progress.update(self._trial, total=total, completed=done, info=escape(f"evaluating: {text}"))

    def trial_end(self, number: int, variant: str, state: str, seconds: float, detail: str = "") -> None:
        from rich.markup import escape

        color = {"COMPLETE": "green", "PRUNED": "yellow"}.get(state, "red")
        line = f"trial {number} [bold]{escape(variant)}[/bold]: [{color}]{state}[/{color}] in {seconds:.1f}s"
        self._progress.console.print(f"{line} {escape(detail)}".rstrip())
        if self._trial is not None:
            self._progress.remove_task(self._trial)
            self._trial = None

    def message(self, text: str) -> None:
        self._progress.console.print(text, markup=False)

    def close(self) -> None:
        self._progress.stop()
