"""Run a study with Optuna: create or resume it, reconcile what a killed run left, run the trials.

One Optuna trial is one variant (component subset + hyperparameters + seed). Two kinds of trial:

- **fixed points** (an ablation grid, and the baselines of a search): every point of
  ``harness.plan.grid_points(spec)`` is enqueued as a WAITING trial carrying the user attribute
  ``point_key``; workers claim WAITING trials atomically (the storage's compare-and-set from WAITING to
  RUNNING, as ``Study.ask`` does), so no point runs twice at once. Enqueue order is the plan's order
  (baselines first).
- **searched points** (``search.sampler`` tpe / random): after the fixed points, ``study.ask()`` and
  ``harness.plan.suggest_point(trial, spec)``, until ``search.n_trials`` searched trials or
  ``search.timeout`` seconds; a pruner reads the dev-set metric the trial reports while it trains.

Resume (the same command again): RUNNING trials whose owner process is gone (owner = host, pid and
process start time, stored on the trial) become FAIL with reason "interrupted"; their MLflow runs are
closed as KILLED; fixed points with no COMPLETE trial and no WAITING/RUNNING one are enqueued again.
COMPLETE points never rerun. A failing trial (non-finite loss, out of memory, any exception) is FAIL with
its reason (user attribute ``fail_reason`` and MLflow tag) and the study goes on; only a user error
(``HarnessError``, e.g. missing data) stops it, since every later trial would hit it too.

Storage: ``sqlite:///<output_dir>/optuna.db`` by default; with ``workers > 1`` a journal file
(``<output_dir>/optuna.journal``: Optuna's advice is never SQLite for parallel writers); any URL given
(``postgresql://...``) as is, for several machines. Distributed caveat: a RUNNING trial owned by another
host cannot be checked for liveness from here; it is reconciled by a run on its own host.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import optuna_compat
from harness.data.check import check_study_data
from harness.errors import HarnessError
from harness.history import check_tracking_history
from harness.output_dir import lock_output_dir, prepare_output_dir
from harness.progress import LineProgress, RichProgress, StudyProgress
from harness.storage_errors import describe_storage_error, quiet_store_logs
from harness.store_init import ensure_mlflow_store, ensure_optuna_store
from harness.workers import clamp_message, device_cap, points_cap, run_child

if TYPE_CHECKING:
    import optuna

    from harness.spec import StudySpec
    from harness.tracking import StudyTracking
    from harness.trial import TrialContext

__all__ = ["StudySummary", "TrialFn", "load_study", "resolve_storage", "run_study", "study_trials"]

TrialFn = Callable[[Any, "StudySpec", "TrialContext"], Mapping[str, float]]
JOURNAL_SCHEME = "journal:///"
INTERRUPTED = "interrupted"
INTERRUPTED_BY_USER = "interrupted by user"
# Seconds between a trial's heartbeats on a shared RDB storage; UNISD_HEARTBEAT_S shortens it (tests).
HEARTBEAT_S = float(os.environ.get("UNISD_HEARTBEAT_S") or 60.0)
HEARTBEAT_STALE_S = 10 * HEARTBEAT_S  # ten missed beats: the owner on another host is gone
_ORPHAN_GRACE = timedelta(minutes=2)  # a RUNNING trial without an owner record: claimed, then killed at once


@dataclass
class StudySummary:
    """What one ``run_study`` call did. ``overhead_share``: wall time outside training and evaluation."""

    study: str
    storage: str
    output_dir: str
    dry_run: bool = False
    total_points: int = 0
    states: dict[str, int] = field(default_factory=dict)
    ran: int = 0
    wall_seconds: float = 0.0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    overhead_share: float | None = None
    interrupted: bool = False
    crashed_workers: list[int] = field(default_factory=list)
    plan: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Storage


def resolve_storage(spec: StudySpec, workers: int = 1) -> str:
    """The Optuna storage URL of a study (``journal:///path`` stands for a journal file).

    An explicit ``spec.storage`` (or ``--storage``) wins; else whatever this output dir already holds,
    so a study resumed with another ``--workers`` keeps its storage; else SQLite for one worker and a
    journal file for several.
    """
    out = spec.output_path.resolve()
    if spec.storage:
        url = spec.storage
    elif (out / "optuna.journal").exists():
        url = JOURNAL_SCHEME + str(out / "optuna.journal")
    elif (out / "optuna.db").exists() or workers <= 1:
        url = f"sqlite:///{out / 'optuna.db'}"
    else:
        url = JOURNAL_SCHEME + str(out / "optuna.journal")
    if workers > 1 and url.startswith("sqlite"):
        raise HarnessError(
            f"--workers {workers} cannot share the SQLite storage {url} (parallel SQLite writers corrupt or lock it); "
            "use a new --output-dir (a journal file is then used) or --storage postgresql://..."
        )
    return url


def _make_storage(url: str, *, create: bool = True):
    """An Optuna storage for ``url``. ``create=False``: the schema must exist; no DDL is issued, so a
    reader (``harness status``, a worker) never races the process creating the tables."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    if url.startswith(JOURNAL_SCHEME):
        path = Path("/" + url.removeprefix(JOURNAL_SCHEME).lstrip("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    kwargs: dict[str, Any] = {"skip_table_creation": not create}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # A long busy timeout: `harness status` or a monitoring thread may hold the lock for a moment.
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    for attempt in range(5):
        try:
            return RDBStorage(url, **kwargs)
        except (ImportError, ValueError) as err:
            raise HarnessError(f"cannot open Optuna storage {url}: {err}") from err
        except Exception as err:  # schema creation racing another process: the second try finds the tables
            if attempt == 4:
                raise HarnessError(f"cannot open Optuna storage {url}: {str(err).splitlines()[0]}") from err
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _sampler(spec: StudySpec, worker: int = 0):
    import optuna

    seed = spec.search.seed + worker  # distinct streams: workers must not all propose the same point
    if spec.search.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    # grid: every trial is a fixed point and suggests nothing; the sampler is never consulted.
    return optuna.samplers.RandomSampler(seed=seed)


def _pruner(spec: StudySpec):
    import optuna

    if spec.search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if spec.search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def load_study(spec: StudySpec, storage_url: str, *, create: bool, worker: int = 0) -> optuna.Study:
    """Open (or create) the study named by the spec; refuse one whose objectives changed."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    directions = [o.direction for o in spec.search.objectives]
    storage = _make_storage(storage_url, create=create)
    if create:
        study = optuna.create_study(
            storage=storage,
            study_name=spec.name,
            directions=directions,
            sampler=_sampler(spec, worker),
            pruner=_pruner(spec),
            load_if_exists=True,
        )
    else:
        try:
            study = optuna.load_study(
                study_name=spec.name, storage=storage, sampler=_sampler(spec, worker), pruner=_pruner(spec)
            )
        except KeyError as err:
            raise HarnessError(f"no study {spec.name!r} in {storage_url}: run `harness run` first") from err
        except HarnessError:
            raise
        except Exception as err:  # e.g. a storage still being created by `harness run`
            raise HarnessError(
                f"cannot read study {spec.name!r} in {storage_url}: {str(err).splitlines()[0]}"
            ) from err
    found = [d.name.lower() for d in study.directions]
    if found != directions:
        raise HarnessError(
            f"study {spec.name!r} in {storage_url} has directions {found}, the spec asks {directions}: "
            "use a new output_dir (or study name) for a changed objective"
        )
    return study


def study_trials(
    spec: StudySpec, *, storage: str | None = None
) -> tuple[str, list[optuna.trial.FrozenTrial]]:
    """The storage URL and every trial of an existing study (for ``harness status``)."""
    url = storage or resolve_storage(spec, workers=1)
    if url.startswith(("sqlite:///", JOURNAL_SCHEME)):
        path = Path("/" + url.split(":///", 1)[1].lstrip("/"))
        if not path.exists():
            raise HarnessError(f"no study storage at {path}: run `harness run` on this spec first")
    study = load_study(spec, url, create=False)
    return url, study.get_trials(deepcopy=False)


# --------------------------------------------------------------------------------------------------
# Trial ownership and reconciliation


def _process_start(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def _host() -> str:
    """This machine in trial ownership records: ``UNISD_HOST`` when set (machines or containers that share
    a host name must set distinct ones), else the host name."""
    return os.environ.get("UNISD_HOST") or socket.gethostname()


def _owner_record() -> dict[str, Any]:
    return {"host": _host(), "pid": os.getpid(), "started": _process_start(os.getpid())}


def _owner_alive(owner: Mapping[str, Any]) -> bool | None:
    """True/False for a process on this host; None when the owner runs elsewhere (cannot tell)."""
    if owner.get("host") != _host():
        return None
    started = _process_start(int(owner["pid"]))
    # A pid is reused after its process dies: the start time tells the original from an impostor.
    return started is not None and abs(started - float(owner.get("started") or 0)) < 1.0


def _is_stale(trial: optuna.trial.FrozenTrial) -> bool:
    owner = trial.user_attrs.get("owner")
    if owner is None:
        start = trial.datetime_start or datetime.now()
        return datetime.now() - start > _ORPHAN_GRACE
    alive = _owner_alive(owner)
    if alive is None:  # another host: trust its heartbeat (shared RDB storages only)
        beat = trial.user_attrs.get("heartbeat")
        return beat is not None and time.time() - float(beat) > HEARTBEAT_STALE_S
    return not alive


def _stale_reason(trial: optuna.trial.FrozenTrial) -> str:
    """A stale trial's fail reason: "interrupted", plus the silent host when the heartbeat told (another
    machine), so whoever reads the study knows which machine to look at."""
    owner = trial.user_attrs.get("owner") or {}
    beat = trial.user_attrs.get("heartbeat")
    if owner.get("host") not in (None, _host()) and beat is not None:
        return f"{INTERRUPTED}: no heartbeat from {owner['host']} for {time.time() - float(beat):.0f}s"
    return INTERRUPTED


class _Heartbeat:
    """Stamps the trial every HEARTBEAT_S seconds, so a worker on another machine can tell a live trial from
    one whose host died. Only for shared RDB storages (PostgreSQL, MySQL): on one machine the owner's pid
    answers, and a second writer thread on SQLite would only contend for its lock."""

    def __init__(self, study: optuna.Study, trial_id: int, url: str) -> None:
        self._stop = threading.Event()
        self._thread = None
        if url.startswith(("sqlite", JOURNAL_SCHEME)):
            return
        self._study, self._trial_id = study, trial_id
        self._beat()
        self._thread = threading.Thread(target=self._loop, name="trial-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        optuna_compat.set_user_attr(self._study, self._trial_id, "heartbeat", time.time())

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._beat()
            except Exception:  # the trial finished meanwhile, or the server blinked: the next beat retries
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _fixed_points(spec: StudySpec) -> dict[str, Any]:
    from harness.plan import grid_points, point_key

    points: dict[str, Any] = {}
    for point in grid_points(spec):
        points.setdefault(point_key(point), point)
    return points


def reconcile(
    study: optuna.Study, spec: StudySpec, points: Mapping[str, Any], tracking_uri: str | None
) -> dict[str, int]:
    """Make the storage consistent before trials run; return counts of what was repaired."""
    from optuna.trial import TrialState

    from harness import tracking as mltrack

    repaired = {"interrupted": 0, "enqueued": 0, "dropped": 0}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _is_stale(trial):
            continue
        optuna_compat.set_user_attr(study, trial, "fail_reason", _stale_reason(trial))
        optuna_compat.set_state(study, trial, TrialState.FAIL)
        repaired["interrupted"] += 1
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if trial.user_attrs.get("point_key") not in points:  # the spec changed since it was enqueued
            optuna_compat.set_user_attr(study, trial, "fail_reason", "point no longer in the spec")
            optuna_compat.set_state(study, trial, TrialState.FAIL)
            repaired["dropped"] += 1
    trials = study.get_trials(deepcopy=False)
    covered = {
        t.user_attrs.get("point_key")
        for t in trials
        if t.user_attrs.get("fixed")
        and t.state in (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
    }
    for key, point in points.items():
        if key not in covered:
            study.enqueue_trial({}, user_attrs={"point_key": key, "fixed": True, **_point_attrs(point)})
            repaired["enqueued"] += 1
    if tracking_uri is not None:
        states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
        reasons = {t.number: t.user_attrs.get("fail_reason") for t in study.get_trials(deepcopy=False)}
        mltrack.close_dangling_runs(tracking_uri, spec, states, reasons)
    return repaired


@contextlib.contextmanager
def _reconcile_lock(study: optuna.Study, url: str) -> Iterator[None]:
    """On PostgreSQL, one process reconciles a study at a time (an advisory lock named after the study).

    Two machines started together would otherwise both find every point missing and enqueue it twice;
    each point still ran once (the copies failed as duplicates), but the study was littered with FAILs.
    """
    if not url.startswith("postgresql"):
        yield
        return
    import hashlib

    from sqlalchemy import text

    digest = hashlib.sha256(f"unisd-harness:{study.study_name}".encode()).digest()
    key = int.from_bytes(digest[:8], "big", signed=True)
    with optuna_compat.rdb_engine(study).connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})


def _point_attrs(point: Any) -> dict[str, Any]:
    from harness.plan import point_summary

    return dict(point_summary(point))


# --------------------------------------------------------------------------------------------------
# One worker's loop


@dataclass
class _WorkerArgs:
    spec: StudySpec
    storage_url: str
    tracking: StudyTracking
    trial_fn: TrialFn | None
    worker: int
    n_workers: int
    started_at: float
    gpus_per_trial: int = 1


def _claim_waiting(study: optuna.Study) -> optuna.Trial | None:
    """Atomically move one WAITING trial to RUNNING (the storage's compare-and-set), as Study.ask does."""
    from optuna.trial import TrialState

    for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial = optuna_compat.claim_waiting(study, frozen)
        if trial is not None:
            return trial
    return None


def _search_budget_left(study: optuna.Study, spec: StudySpec, started_at: float) -> bool:
    search = spec.search
    if search.sampler == "grid":
        return False
    if search.timeout is not None and time.time() - started_at >= search.timeout:
        return False
    if search.n_trials is None:
        return True
    used = sum(
        1
        for t in study.get_trials(deepcopy=False)
        if not t.user_attrs.get("fixed")
        and not str(t.user_attrs.get("fail_reason", "")).startswith(INTERRUPTED)
    )
    return used < search.n_trials


def _failure_reason(err: BaseException) -> str:
    name = type(err).__name__
    if name == "NonFiniteLossError":  # its message names the optimizer step and the loss term
        return str(err)[:500]
    if name == "OutOfMemoryError" or "out of memory" in str(err).lower():
        return f"out of memory: {str(err).splitlines()[0] if str(err) else name}"[:500]
    first = str(err).splitlines()[0] if str(err) else ""
    return f"{name}: {first}"[:500]


def _objective_values(spec: StudySpec, metrics: Mapping[str, float]) -> list[float]:
    values = []
    for objective in spec.search.objectives:
        value = metrics.get(objective.metric)
        if value is None:
            raise ValueError(f"objective metric {objective.metric!r} missing from the trial's metrics")
        if not math.isfinite(float(value)):
            raise ValueError(f"objective metric {objective.metric!r} is {value}")
        values.append(float(value))
    return values


def _run_one(
    study: optuna.Study,
    trial: optuna.Trial,
    point: Any,
    args: _WorkerArgs,
    progress: StudyProgress,
) -> str:
    """Run one claimed trial to a final state; return it. Re-raises KeyboardInterrupt and HarnessError."""
    import optuna
    from optuna.trial import TrialState

    from harness.axes import cell_cache_dir, cell_spec
    from harness.library_output import trial_output
    from harness.plan import point_key, point_summary
    from harness.tracking import TrialRun
    from harness.trial import TrialContext, run_trial

    study_spec = args.spec
    spec = cell_spec(study_spec, point)  # the trial sees one model, and under per_task one training task
    trial_fn = args.trial_fn or run_trial
    number = trial.number
    summary = dict(point_summary(point))
    variant = str(summary.get("variant", "?"))
    for key, value in {"point_key": point_key(point), **summary}.items():
        trial.set_user_attr(key, value)
    progress.trial_start(number, variant)
    started = time.perf_counter()
    run = TrialRun.start(
        args.tracking,
        trial_number=number,
        variant=variant,
        family=str(summary.get("family", "")),
        seed=int(summary.get("seed", 0)),
        components=summary.get("components", {}),
        params=summary.get("params", {}),
        point_key=point_key(point),
        extra_tags={
            k: summary[k] for k in ("model", "train_task", "variant_kind") if summary.get(k) is not None
        },
    )
    trial.set_user_attr("mlflow_run_id", run.run_id)
    trial_dir = spec.output_path.resolve() / "trials" / str(number)
    trial_dir.mkdir(parents=True, exist_ok=True)
    ctx = TrialContext(
        number=number,
        output_dir=spec.output_path.resolve(),
        trial_dir=trial_dir,
        cache_dir=cell_cache_dir(study_spec, point, spec.output_path.resolve()),
        run=run,
        progress=progress,
        optuna_trial=trial if spec.search.pruner != "none" else None,
        processes=args.gpus_per_trial,
    )

    def fail(reason: str, *, user: bool = False) -> None:
        trial.set_user_attr("fail_reason", reason)
        trial.set_user_attr("seconds", time.perf_counter() - started)
        study.tell(trial, state=TrialState.FAIL)
        run.finish("INTERRUPTED" if user else "FAIL", reason)
        progress.trial_end(number, variant, "FAIL", time.perf_counter() - started, reason)

    try:
        with trial_output(trial_dir / "trial.log", progress):  # library warnings there, lm-eval bars folded
            metrics = dict(trial_fn(point, spec, ctx))
        values = _objective_values(spec, metrics)
    except optuna.TrialPruned as pruned:
        trial.set_user_attr("seconds", time.perf_counter() - started)
        study.tell(trial, state=TrialState.PRUNED)
        run.finish("PRUNED", str(pruned) or None)
        progress.trial_end(number, variant, "PRUNED", time.perf_counter() - started)
        return "PRUNED"
    except KeyboardInterrupt:
        fail(INTERRUPTED_BY_USER, user=True)
        raise
    except HarnessError as err:
        fail(f"HarnessError: {err}")
        raise
    except Exception as err:  # noqa: BLE001 - any failure of one variant must not stop the study
        reason = _failure_reason(err)
        (trial_dir / "error.txt").write_text("".join(traceback.format_exception(err)))
        run.log_artifact(trial_dir / "error.txt")
        fail(reason)
        _free_accelerator_memory()
        return "FAIL"
    seconds = time.perf_counter() - started
    run.log_metrics(metrics)
    timing = {
        k: float(metrics[k]) for k in ("train_seconds", "eval_seconds", "generated_tokens") if k in metrics
    }
    for key, value in {**timing, "seconds": seconds}.items():
        trial.set_user_attr(key, value)
    study.tell(trial, values)
    run.finish("COMPLETE")
    shown = ", ".join(f"{o.metric}={v:.4g}" for o, v in zip(spec.search.objectives, values, strict=True))
    progress.trial_end(number, variant, "COMPLETE", seconds, shown)
    return "COMPLETE"


def _free_accelerator_memory() -> None:
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _worker_loop(args: _WorkerArgs, progress: StudyProgress) -> int:
    """Claim and run trials until none is left; return how many ran."""
    from harness.plan import suggest_point

    spec = args.spec
    study = load_study(spec, args.storage_url, create=False, worker=args.worker)
    points = _fixed_points(spec)
    ran = 0
    while True:
        trial = _claim_waiting(study)
        if trial is not None:
            trial.set_user_attr("owner", _owner_record())
            key = trial.user_attrs.get("point_key")
            point = points.get(key)
            duplicate = _duplicate_of(study, trial.number, key)
            if point is None or duplicate is not None:
                reason = f"unknown point {key!r}" if point is None else f"duplicate of trial {duplicate}"
                trial.set_user_attr("fail_reason", reason)
                study.tell(trial, state=_fail_state())
                continue
        elif _search_budget_left(study, spec, args.started_at):
            trial = study.ask()
            trial.set_user_attr("owner", _owner_record())
            point = suggest_point(trial, spec)
        else:
            return ran
        heartbeat = _Heartbeat(study, optuna_compat.trial_id(trial), args.storage_url)
        try:
            _run_one(study, trial, point, args, progress)
        finally:
            heartbeat.stop()
        ran += 1
        progress.study_advance(_finished_count(study))


def _duplicate_of(study: optuna.Study, number: int, key: str | None) -> int | None:
    """Another trial of the same fixed point that is done, or queued/running ahead of this one.

    Two ``harness run`` started at once on different machines may both enqueue a missing point; the
    lower trial number wins, so a point still runs exactly once.
    """
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False):
        if t.number == number or not t.user_attrs.get("fixed") or t.user_attrs.get("point_key") != key:
            continue
        if t.state == TrialState.COMPLETE or (
            t.state in (TrialState.RUNNING, TrialState.WAITING) and t.number < number
        ):
            return t.number
    return None


def _fail_state():
    from optuna.trial import TrialState

    return TrialState.FAIL


def _finished_count(study: optuna.Study) -> int:
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    fixed_done = {
        t.user_attrs.get("point_key")
        for t in study.get_trials(deepcopy=False, states=done)
        if t.user_attrs.get("fixed")
    }
    searched = sum(1 for t in study.get_trials(deepcopy=False, states=done) if not t.user_attrs.get("fixed"))
    return len(fixed_done) + searched


def _interrupt_once() -> None:
    """SIGINT/SIGTERM -> one KeyboardInterrupt; later signals are ignored while the trial is marked."""
    fired = {"done": False}

    def handler(signum, frame):  # noqa: ARG001
        if fired["done"]:
            return
        fired["done"] = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _worker_main(args: _WorkerArgs) -> None:
    """Entry of a spawned worker process (through ``harness.workers.run_child``, which makes it die with
    its parent). Exit codes: 0 done, 130 interrupted, 2 user error, 1 crash."""
    from unisd_components.cpu_memory import keep_freed_memory

    quiet_store_logs()
    keep_freed_memory()
    _interrupt_once()
    from harness.library_output import quiet_libraries

    quiet_libraries(args.spec.output_path / "harness.log")
    if args.n_workers > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
        _pin_gpus(args.worker, args.gpus_per_trial)
    progress = LineProgress(prefix=f"[worker {args.worker}] ")
    try:
        _worker_loop(args, progress)
    except KeyboardInterrupt:
        sys.exit(130)
    except HarnessError as err:
        print(f"[worker {args.worker}] error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:  # a full disk, a broken store: one line naming it, not a traceback
        message = describe_storage_error(err, optuna_url=args.storage_url, tracking_uri=args.tracking.tracking_uri)
        if message is None:
            raise
        print(f"[worker {args.worker}] error: {message}", file=sys.stderr)
        sys.exit(2)


def _pin_gpus(worker: int, per_trial: int = 1) -> None:
    """Worker i sees its own ``per_trial`` GPUs: ``[i*per_trial, (i+1)*per_trial)`` modulo the GPU count
    (CUDA is not initialised yet in a fresh process)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count > 1:
        first = worker * per_trial
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str((first + j) % count) for j in range(per_trial))


# --------------------------------------------------------------------------------------------------
# The study


def _default_progress() -> StudyProgress:
    return RichProgress() if sys.stderr.isatty() else LineProgress()


def _run_workers(
    args: _WorkerArgs, n: int, study: optuna.Study, total: int, progress: StudyProgress
) -> tuple[bool, list[int]]:
    """Spawn ``n`` worker processes on the shared storage; return (interrupted, crashed worker ids)."""
    context = multiprocessing.get_context("spawn")
    procs = []
    for i in range(n):
        worker_args = _WorkerArgs(**{**args.__dict__, "worker": i, "n_workers": n})
        payload = pickle.dumps((_worker_main, (worker_args,)))  # unpickled after die_with_parent
        proc = context.Process(target=run_child, args=(os.getpid(), payload), name=f"harness-worker-{i}")
        proc.start()
        procs.append(proc)
    interrupted = False
    try:
        while any(p.is_alive() for p in procs):
            progress.study_advance(_finished_count(study), total)
            for p in procs:
                p.join(timeout=2.0 / n)
    except KeyboardInterrupt:
        interrupted = True
        for p in procs:  # a terminal's Ctrl-C reached them already; a `kill -INT <parent>` did not
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGINT)
        for p in procs:
            p.join(timeout=120)
    codes = [p.exitcode for p in procs]
    if any(c == 130 for c in codes):
        interrupted = True
    if any(c == 2 for c in codes):
        raise HarnessError("a worker stopped on a user error (see its message above)")
    crashed = [i for i, c in enumerate(codes) if c not in (0, 130)]
    if crashed and not interrupted:
        # Their running trials stay RUNNING with a dead owner: the next run marks them and reruns the points.
        progress.message(f"workers {crashed} exited abnormally (codes {[codes[i] for i in crashed]})")
    return interrupted, crashed


def _check_gpus_per_trial(spec: StudySpec, workers: int, gpus_per_trial: int) -> None:
    """Data-parallel trials: enough GPUs for every worker, and no pruner (its dev evaluations run
    inside the training loop, which then lives in other processes)."""
    if gpus_per_trial < 1:
        raise HarnessError(f"--gpus-per-trial must be >= 1 (got {gpus_per_trial})")
    if gpus_per_trial == 1:
        return
    if spec.search.pruner != "none":
        raise HarnessError(
            f"--gpus-per-trial {gpus_per_trial} cannot prune (search.pruner: {spec.search.pruner}): the dev "
            "evaluations that pruning needs run inside training; set search.pruner: none"
        )
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    wanted = workers * gpus_per_trial
    if any(m.device != "cpu" for m in spec.models()) and count and wanted > count:
        raise HarnessError(
            f"--workers {workers} x --gpus-per-trial {gpus_per_trial} needs {wanted} GPUs; this machine has {count}"
        )


def run_study(
    spec: StudySpec,
    *,
    output_dir: str | Path | None = None,
    workers: int = 1,
    gpus_per_trial: int = 1,
    storage: str | None = None,
    dry_run: bool = False,
    trial_fn: TrialFn | None = None,
    progress: StudyProgress | None = None,
) -> StudySummary:
    """Create or resume the study and run every trial left; see the module docstring.

    ``trial_fn(point, spec, ctx) -> metrics`` defaults to ``harness.trial.run_trial``; with ``workers > 1``
    it must be importable by name (a module-level function), since workers are spawned processes.
    Raises KeyboardInterrupt after marking the running trial(s) when interrupted (the CLI exits 130).
    """

    from harness.plan import describe_plan, format_plan

    if workers < 1:
        raise HarnessError(f"--workers must be >= 1 (got {workers})")
    _check_gpus_per_trial(spec, workers, gpus_per_trial)
    spec = spec.with_overrides(output_dir=output_dir, storage=storage)
    if dry_run:
        return StudySummary(
            spec.name,
            spec.storage_url,
            str(spec.output_path),
            dry_run=True,
            plan=format_plan(describe_plan(spec)),
        )
    started_wall = time.time()
    t0 = time.perf_counter()
    prepare_output_dir(spec.output_path)  # a file in the way, no write access: one line
    with lock_output_dir(spec.output_path, needed=_local_stores(spec)):  # a second run here: one line
        try:
            return _run_locked(spec, workers, gpus_per_trial, trial_fn, progress, started_wall, t0)
        except Exception as err:  # a full disk, a broken store: one line naming the store and the cause
            message = describe_storage_error(err, optuna_url=resolve_storage(spec), tracking_uri=spec.tracking_uri)
            if message is None:
                raise
            raise HarnessError(message) from err


def _local_stores(spec: StudySpec) -> bool:
    """Whether a store of this run lives in its output dir (SQLite or a journal file): then two runs race."""
    storage = spec.storage or ""
    return not storage.startswith(("postgresql", "mysql")) or spec.tracking_uri.startswith("sqlite")


def _points_left(study: optuna.Study, spec: StudySpec) -> int | None:
    """Trials this run may still start: queued fixed points plus the searched budget (None: unbounded)."""
    from optuna.trial import TrialState

    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    if spec.search.sampler == "grid":
        return waiting
    if spec.search.n_trials is None:
        return None
    used = sum(
        1
        for t in study.get_trials(deepcopy=False)
        if not t.user_attrs.get("fixed") and not str(t.user_attrs.get("fail_reason", "")).startswith(INTERRUPTED)
    )
    return waiting + max(0, spec.search.n_trials - used)


def _run_locked(
    spec: StudySpec,
    workers: int,
    gpus_per_trial: int,
    trial_fn: TrialFn | None,
    progress: StudyProgress | None,
    started_wall: float,
    t0: float,
) -> StudySummary:
    """The body of :func:`run_study`, run while the output dir is locked."""
    from harness.tracking import finish_study, init_tracking

    quiet_store_logs()  # a store error is reported once, in one line (see run_study)
    notes = []
    requested = workers
    most, why = device_cap(spec.models()[0].device, gpus_per_trial)  # models of one study share devices
    if workers > most:
        workers = most
        notes.append(clamp_message(requested, workers, why))
    if trial_fn is None:
        check_study_data(spec)  # a corrupt or missing benchmark file stops the study before any training
    warm = _start_warm_up(spec) if workers == 1 and trial_fn is None else None
    url = resolve_storage(spec, workers)
    ensure_optuna_store(url)  # SQLite schemas built whole or not at all (a full disk must not leave half)
    study = load_study(spec, url, create=True)
    check_tracking_history(spec, study, url)  # mlflow.db deleted, optuna.db kept: one line, before a new store
    ensure_mlflow_store(spec.tracking_uri)
    tracking = init_tracking(spec, parent_run_id=study.user_attrs.get("mlflow_parent_run_id"))
    study.set_user_attr("mlflow_parent_run_id", tracking.parent_run_id)
    points = _fixed_points(spec)
    with _reconcile_lock(study, url):
        repaired = reconcile(study, spec, points, tracking.tracking_uri)
    total = len(points) + (spec.search.n_trials or 0)
    progress = progress or _default_progress()
    left = _points_left(study, spec)
    if workers > points_cap(left):
        workers = points_cap(left)
        notes = [clamp_message(requested, workers, f"{left} trial(s) left to run")]
    for note in notes:
        progress.message(note)
    if repaired["interrupted"] or repaired["dropped"]:
        progress.message(
            f"resumed: {repaired['interrupted']} interrupted trial(s) marked FAIL, "
            f"{repaired['enqueued']} point(s) queued again"
        )
    progress.study_start(total, _finished_count(study))
    args = _WorkerArgs(spec, url, tracking, trial_fn, 0, workers, started_wall, gpus_per_trial)
    interrupted = False
    crashed: list[int] = []
    previous = _install_sigterm()
    try:
        if workers == 1:
            if warm is not None:
                warm.join()
            _worker_loop(args, progress)
        else:
            interrupted, crashed = _run_workers(args, workers, study, total, progress)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.study_advance(_finished_count(study), total)
        progress.close()
    wall = time.perf_counter() - t0
    trials = study.get_trials(deepcopy=False)
    mine = [
        t
        for t in trials
        if t.datetime_complete is not None and t.datetime_complete.timestamp() >= started_wall
        # on a shared storage, other machines finish trials meanwhile: they are not this run's work
        and (t.user_attrs.get("owner") or {}).get("host", _host()) == _host()
        and (workers > 1 or (t.user_attrs.get("owner") or {}).get("pid", os.getpid()) == os.getpid())
    ]
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    train = sum(float(t.user_attrs.get("train_seconds", 0.0)) for t in mine)
    evaluation = sum(float(t.user_attrs.get("eval_seconds", 0.0)) for t in mine)
    summary = StudySummary(
        study=spec.name,
        storage=url,
        output_dir=str(spec.output_path),
        total_points=total,
        states=states,
        ran=len(mine),
        wall_seconds=wall,
        train_seconds=train,
        eval_seconds=evaluation,
        overhead_share=(1 - (train + evaluation) / wall) if workers == 1 and wall > 0 and mine else None,
        interrupted=interrupted,
        crashed_workers=crashed,
    )
    finish_study(
        tracking,
        "KILLED" if interrupted else "FINISHED",
        {
            "ran": summary.ran,
            "wall_seconds": wall,
            "train_seconds": train,
            "eval_seconds": evaluation,
            **{f"n_{k.lower()}": v for k, v in states.items()},
        },
    )
    if interrupted:
        raise KeyboardInterrupt
    return summary


def _start_warm_up(spec: StudySpec) -> threading.Thread:
    """Load the base model and the training/evaluation stacks while the stores are set up (MLflow's
    schema creation alone takes seconds). A failure here is ignored: the first trial meets it again and
    reports it properly."""

    def warm() -> None:
        try:
            from harness.axes import cell_spec
            from harness.plan import grid_points
            from harness.trial import warm_up

            points = grid_points(spec)
            warm_up(cell_spec(spec, points[0]) if points else spec)
        except BaseException:  # noqa: BLE001
            pass

    thread = threading.Thread(target=warm, name="warm-up", daemon=True)
    thread.start()
    return thread


def _install_sigterm():
    """SIGTERM (a scheduler's preemption) behaves like Ctrl-C: the running trial is marked, then exit."""

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


# --------------------------------------------------------------------------------------------------
# Plan and status


def status(spec: StudySpec, *, storage: str | None = None) -> dict[str, Any]:
    """The study's trials as plain data: ``{"study", "storage", "trials": [{number, state, params, values,
    mlflow_run_id, variant, duration_seconds, fail_reason}]}`` (``harness status --json`` prints it)."""
    url, trials = study_trials(spec, storage=storage)
    rows = []
    for t in trials:
        attrs = t.user_attrs
        duration = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        params = dict(t.params) if t.params else dict(attrs.get("params", {}))
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "variant": attrs.get("variant"),
                "model": attrs.get("model"),
                "train_task": attrs.get("train_task"),
                "seed": attrs.get("seed"),
                "params": params,
                "values": list(t.values) if t.values is not None else None,
                "mlflow_run_id": attrs.get("mlflow_run_id"),
                "duration_seconds": duration,
                "fail_reason": attrs.get("fail_reason"),
            }
        )
    return {
        "study": spec.name,
        "storage": url,
        "objectives": [o.metric for o in spec.search.objectives],
        "trials": rows,
    }
