"""Where a report's table comes from: any factorial CSV, or a finished study (MLflow runs, Optuna trials)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from harness.errors import HarnessError
from harness.report.build import ReportFiles, build_report

__all__ = [
    "default_report_dir",
    "question_records",
    "read_results_csv",
    "report_for_study",
    "report_from_csv",
    "split_names",
]


def split_names(text: str | None, what: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``; an empty list is an error naming the option."""
    names = [part.strip() for part in (text or "").split(",") if part.strip()]
    if not names:
        raise HarnessError(f"--{what} is required with --from-csv: a comma-separated list of column names")
    return names


def read_results_csv(path: str | Path, components: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Read a factorial results table and check that the named columns exist and hold usable values."""
    file = Path(path)
    if not file.is_file():
        raise HarnessError(f"{file}: no such results file")
    try:
        df = pd.read_csv(file)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise HarnessError(f"{file}: not a readable CSV table ({str(err).splitlines()[0]})") from None
    missing = [c for c in [*components, *metrics] if c not in df.columns]
    if missing:
        raise HarnessError(
            f"{file}: unknown column(s) {', '.join(missing)}; columns: {', '.join(map(str, df.columns))}"
        )
    for c in components:
        values = pd.to_numeric(df[c], errors="coerce")
        if values.isna().any() or not set(values.unique().tolist()) <= {0, 1}:
            raise HarnessError(f"{file}: component column {c!r} must hold only 0 and 1")
        df[c] = values.astype(int)
    for m in metrics:
        values = pd.to_numeric(df[m], errors="coerce")
        if values.notna().sum() == 0:
            raise HarnessError(f"{file}: metric column {m!r} has no numeric value")
        df[m] = values
    return df


def report_from_csv(
    path: str | Path,
    *,
    components: Sequence[str],
    metrics: Sequence[str],
    out_dir: str | Path,
    title: str | None = None,
) -> ReportFiles:
    """``harness report --from-csv``: the full analysis on any 0/1 factorial table (``seed`` optional)."""
    df = read_results_csv(path, components, metrics)
    return build_report(
        df,
        components=list(components),
        metrics=list(metrics),
        out_dir=Path(out_dir),
        title=title or f"Component report: {Path(path).name}",
    )


def question_records(
    output_dir: str | Path, results: pd.DataFrame, metrics: Sequence[str]
) -> pd.DataFrame | None:
    """Per-question scores of the COMPLETE trials: ``<output_dir>/trials/<n>/eval/samples.jsonl``.

    One row per (variant, seed, benchmark, question) with ``metric`` (``scienceqa.acc``) and ``score``,
    for the benchmark metrics in ``metrics``. A base trial that reused another's evaluation (the base
    model is scored once per study) takes that trial's samples. None when no trial left samples, or when
    a variant has several trials for one seed (a search, or grid axes over hyperparameters): pooling
    different hyperparameters under one variant name would not be a paired comparison of that variant.
    """
    import json

    from harness.report.effects import complete_rows

    wanted = {
        m.split(".", 1)[0]: m.split(".", 1)[1] for m in metrics if "." in m and not m.startswith("mean.")
    }
    root = Path(output_dir) / "trials"
    rows: list[dict] = []
    base_samples = None
    done = complete_rows(results)
    trained = done[done.get("family", pd.Series("", index=done.index)).astype(str) != "base"]
    if trained.duplicated(["variant", "seed"]).any():
        return None
    for family in ("base", None):  # base first, so reusing trials find its samples
        for _, r in done.iterrows():
            if (family == "base") != (str(r.get("family", "")) == "base"):
                continue
            path = root / str(int(r["trial"])) / "eval" / "samples.jsonl"
            if not path.is_file() and family == "base" and base_samples is not None:
                path = base_samples
            if not path.is_file():
                continue
            if family == "base":
                base_samples = base_samples or path
            for line in path.read_text(encoding="utf-8").splitlines():
                sample = json.loads(line)
                score_name = wanted.get(sample["benchmark"])
                score = sample.get("scores", {}).get(score_name) if score_name else None
                if isinstance(score, bool | int | float):
                    rows.append(
                        {
                            "variant": r["variant"],
                            "seed": int(r.get("seed", 0)),
                            "benchmark": sample["benchmark"],
                            "question": str(sample["id"]),
                            "metric": f"{sample['benchmark']}.{score_name}",
                            "score": float(score),
                        }
                    )
    if not rows:
        return None
    records = pd.DataFrame(rows)
    # A base trial per seed evaluates the same untrained model: one set of answers, counted once.
    base = records["variant"].isin(done.loc[done.get("family", pd.Series(dtype=str)) == "base", "variant"])
    dedup = records[base].drop_duplicates(["variant", "benchmark", "question"])
    return pd.concat([dedup, records[~base]], ignore_index=True)


def default_report_dir(spec) -> Path:
    """Where a study's report goes unless told otherwise: ``<output_dir>/report``."""
    return spec.output_path / "report"


def report_for_study(spec, *, out_dir: str | Path | None = None, log_artifacts: bool = True) -> ReportFiles:
    """The report of a study spec: results from ``harness.tracking.load_results``, the Optuna study for
    search studies, files under ``out_dir`` (default ``<output_dir>/report``: with the run's stores, so a
    second study of the same name, or the same study run elsewhere, never overwrites it), then logged as
    artifacts on the study's MLflow parent run. The runner calls this at the end of ``harness run``."""
    from harness import tracking
    from unisd_components.config import COMPONENT_NAMES

    df = tracking.load_results(spec)
    if df is None or len(df) == 0:
        raise HarnessError(f"study {spec.name!r} has no trials yet: run `harness run` first")
    varied = spec.method.enabled_anywhere()
    components = [c for c in COMPONENT_NAMES if c in varied and c in df.columns]
    metrics = [
        m
        for m in spec.metric_names()
        if m in df.columns and pd.to_numeric(df[m], errors="coerce").notna().any()
    ]
    if not metrics:
        raise HarnessError(
            f"study {spec.name!r}: no metric recorded yet (expected one of {', '.join(spec.metric_names())})"
        )
    kind = "ablation" if spec.search.sampler == "grid" else "search"
    study = None
    if kind == "search":
        from harness.study import load_study, resolve_storage

        url = resolve_storage(spec)  # SQLite, a --workers journal file, or a server URL
        try:
            study = load_study(spec, url, create=False)
        except Exception as err:  # a missing or foreign storage must not cost the whole report
            raise HarnessError(
                f"study {spec.name!r}: cannot open the Optuna study at {url} ({err})"
            ) from None
    files = build_report(
        df,
        components=components,
        metrics=metrics,
        out_dir=Path(out_dir) if out_dir is not None else default_report_dir(spec),
        title=f"UniSD study {spec.name}: which components drive the gains",
        study_kind=kind,
        optuna_study=study,
        questions=question_records(spec.output_path, df, metrics),
    )
    if study is not None:
        _write_best_spec(spec, study, files.directory)
    if log_artifacts:
        tracking.log_report_artifacts(spec, files.directory)
    return files


def _write_best_spec(spec, study, directory: Path) -> Path | None:
    """A search ends with its best trial pinned as a ready-to-run grid spec: ``best_spec.yaml``."""
    import optuna
    import yaml

    from harness.spec import fixed_spec_data

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.params]
    if not complete:
        return None
    # Baselines enqueued without parameters are not candidates. Several objectives: the Pareto front's
    # best on the first objective (the report lists the whole front).
    front = {t.number for t in study.best_trials}
    candidates = [t for t in complete if t.number in front] or complete
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1.0
    best = max(candidates, key=lambda t: sign * t.values[0])
    data = fixed_spec_data(spec, best.params)
    path = Path(directory) / "best_spec.yaml"
    header = f"# {spec.name}: best trial #{best.number} ({', '.join(f'{v:.4g}' for v in best.values)}), pinned as a grid study\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return path
