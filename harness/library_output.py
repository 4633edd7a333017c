"""Keep the libraries' own output off the user's console: their progress bars, warnings and chatter.

Why: per trial, lm-eval draws four tqdm bars per benchmark ("Checking cached requests", "Running
generate_until requests", ...), transformers and lm-eval warn about the way the harness uses them on
purpose, datasets draws its own bars and MLflow prints a "View run" line per run. In a terminal they bury
the harness's study and trial bars; without one (CI, ``nohup``, ``> log 2>&1``) they are carriage-return
fragments. So, in a process that runs trials:

- lm-eval's bars are replaced by a counter that reports to the harness's own display
  (:meth:`harness.progress.StudyProgress.trial_progress`: "evaluating: generating 5/8" on the trial's
  line; nothing without a terminal, where one line per event is the rule);
- the other libraries' bars are switched off through their own switches (datasets, huggingface_hub,
  transformers, MLflow's URL printing);
- library logging and Python warnings go to a log file: the running trial's ``trials/<n>/trial.log``,
  else ``<output_dir>/harness.log``. Nothing is dropped; it is where a reader of that trial looks.

Example::

    quiet_libraries(spec.output_path / "harness.log")
    with trial_output(trial_dir / "trial.log", progress):
        run_trial(...)
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["FoldedBar", "quiet_libraries", "trial_output"]

# lm-eval's modules that draw bars while a model is scored (they import ``tqdm`` by name).
_LM_EVAL_BAR_MODULES = (
    "lm_eval.api.model",
    "lm_eval.api.task",
    "lm_eval.models.huggingface",
    "harness.evaluation.hf_lm",  # BucketedHFLM draws HFLM's generation bar itself
)
_LIBRARY_LOGGERS = (
    "transformers",
    "datasets",
    "lm_eval",
    "mlflow",
    "optuna",
    "accelerate",
    "peft",
    "sentence_transformers",
    "huggingface_hub",
    "torch",
    "urllib3",
    "alembic",
)
# What lm-eval's bars count, in the words of the harness's display.
_BAR_WORDS = {
    "Checking cached requests": "checking cache",
    "Running generate_until requests": "generating",
    "Running loglikelihood requests": "scoring",
    "Running loglikelihood_rolling requests": "scoring",
}

_lock = threading.Lock()
_sink: list[Callable[[str, int, int | None], None] | None] = [None]
_quiet = [False]  # quiet_libraries ran in this process
_evaluation_folded = [False]


class FoldedBar:
    """Stands in for ``tqdm`` in lm-eval's modules: counts what the bar would draw and reports it to the
    harness's display (at most one report per whole percent), drawing nothing itself."""

    def __init__(self, iterable=None, desc: str | None = None, total: float | None = None, **_: Any) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total = int(total) if total is not None else None
        self.desc = _BAR_WORDS.get(desc or "", desc or "preparing prompts")
        self.n = 0
        self._shown = -1
        self._report()

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.update(1)

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> FoldedBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += int(n)
        self._report()

    def _report(self) -> None:
        sink = _sink[0]
        if sink is None:
            return
        shown = self.n * 100 // self.total if self.total else self.n
        if shown != self._shown:
            self._shown = shown
            sink(self.desc, self.n, self.total)

    def close(self) -> None: ...

    def refresh(self) -> None: ...

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None: ...

    def set_postfix(self, *args: Any, **kwargs: Any) -> None: ...

    @staticmethod
    def write(text: str, *args: Any, **kwargs: Any) -> None:
        logging.getLogger("lm_eval").info(text)


class _FileSwitch(logging.Handler):
    """One handler on the root logger that writes to the current log file (the trial's, else the study's)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.path: Path | None = None

    def emit(self, record: logging.LogRecord) -> None:
        path = self.path
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - a log line must never fail a trial
            self.handleError(record)


_handler = _FileSwitch()


def _route_loggers() -> None:
    """The libraries' loggers lose their own console handlers (MLflow, optuna, datasets set one up on
    import) and pass their records to the root logger, whose only handler writes the current log file."""
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True


def _off(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - a library not installed, or an older one without the switch
        pass


def quiet_libraries(default_log: str | Path | None = None) -> None:
    """Switch off the libraries' bars and send their logging and warnings to a file (see the module).

    Call once in each process that runs trials (``harness run``, its workers); calling again only moves
    the default log file. ``default_log``: where output outside a trial goes (``<output_dir>/harness.log``).
    """
    with _lock:
        if default_log is not None and _handler.path is None:
            _handler.path = Path(default_log).resolve()
        if _handler in logging.getLogger().handlers:
            return
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # "View run ... at ..." per run
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

        def transformers_off() -> None:
            from transformers.utils import logging as tlog

            tlog.disable_progress_bar()
            tlog.disable_default_handler()
            tlog.enable_propagation()

        def hub_off() -> None:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()

        def import_configured() -> None:
            import mlflow  # noqa: F401  (configures its console handler on import: strip it after)
            import optuna  # noqa: F401

        for switch in (import_configured, transformers_off, hub_off):
            _off(switch)
        _quiet[0] = True
        _route_loggers()
        logging.captureWarnings(True)
        root = logging.getLogger()
        root.addHandler(_handler)
        if root.level > logging.WARNING or root.level == logging.NOTSET:
            root.setLevel(logging.WARNING)


def _fold_evaluation_output() -> None:
    """The evaluation stack's part, done when the first trial starts (importing lm-eval takes seconds;
    the runner imports it in a warm-up thread meanwhile)."""
    import importlib

    with _lock:
        if _evaluation_folded[0]:
            return
        _evaluation_folded[0] = True

    def datasets_off() -> None:
        import datasets

        datasets.disable_progress_bars()

    def lm_eval_folded() -> None:
        for name in _LM_EVAL_BAR_MODULES:
            module = importlib.import_module(name)
            if hasattr(module, "tqdm"):
                module.tqdm = FoldedBar
        # lm-eval asks git about the working directory and lets git print "fatal: not a git repository"
        # when it is not one; the harness records its own commit on the study's run.
        from harness.evaluation.quiet_git import silence_lm_eval_git

        silence_lm_eval_git()

    for switch in (datasets_off, lm_eval_folded):
        _off(switch)
    _route_loggers()


@contextlib.contextmanager
def trial_output(log: str | Path, progress: Any = None) -> Iterator[None]:
    """While a trial runs: library logs and warnings to ``log``; lm-eval's progress to ``progress``
    (a :class:`harness.progress.StudyProgress`), on its ``trial_progress`` hook."""
    if _quiet[0]:
        _fold_evaluation_output()
    previous_path, previous_sink = _handler.path, _sink[0]
    _handler.path = Path(log).resolve()
    _sink[0] = None if progress is None else progress.trial_progress
    try:
        yield
    finally:
        _handler.path, _sink[0] = previous_path, previous_sink
