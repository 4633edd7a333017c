"""The ``harness`` command. Thin: parse, call one importable function, print.

Each sub-command's work lives in the module that owns it; this file only wires arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from harness.errors import HarnessError


def _cmd_validate(args: argparse.Namespace) -> int:
    from harness.plan import check_ema_syncs, describe_plan, format_plan
    from harness.spec import load_spec

    spec = load_spec(args.spec)
    check_ema_syncs(spec)
    print(f"{args.spec}: valid")
    print(format_plan(describe_plan(spec)))
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from harness.spec import spec_json_schema

    text = json.dumps(spec_json_schema(), indent=2) + "\n"
    if args.output:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as err:
            raise HarnessError(f"{args.output}: cannot write: {err.strerror}") from None
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from harness.plan import check_ema_syncs
    from harness.spec import load_spec
    from harness.study import run_study
    from unisd_components.cpu_memory import keep_freed_memory

    keep_freed_memory()  # before the first model is loaded (see the module: ~6% per training step on CPU)

    spec = load_spec(args.spec).with_overrides(output_dir=args.output_dir, storage=args.storage)
    if args.json:
        if not args.dry_run:
            raise HarnessError("--json only applies with --dry-run (one JSON object per planned trial)")
        import json

        from harness.plan import plan_json_lines

        for line in plan_json_lines(spec):
            print(json.dumps(line, default=str))
        return 0
    if not args.dry_run:
        from harness.library_output import quiet_libraries

        quiet_libraries(spec.output_path / "harness.log")  # library bars and warnings off the console
        # engine: vllm without vLLM installed: one line and exit 2, before any trial
        from harness.generation_engine import resolve_engine
        from harness.models import resolve_device

        for model in spec.models():
            resolve_engine(spec.generation.engine, resolve_device(model.device).type)
    check_ema_syncs(spec)
    summary = run_study(spec, workers=args.workers, gpus_per_trial=args.gpus_per_trial, dry_run=args.dry_run)
    if summary.dry_run:
        print(summary.plan)
        from harness.memory_estimate import describe_memory

        print(describe_memory(spec, args.gpu_memory))
        return 0
    states = ", ".join(f"{n} {s}" for s, n in sorted(summary.states.items()))
    print(f"study {summary.study}: {states} ({summary.ran} run now, {summary.wall_seconds:.1f}s)")
    if summary.overhead_share is not None:
        work = summary.train_seconds + summary.eval_seconds
        print(
            f"training + evaluation {work:.1f}s; harness overhead {summary.overhead_share:.1%} of the wall time"
        )
    ui = f"harness ui {args.spec}" + (f" --output-dir {args.output_dir}" if args.output_dir else "")
    if spec.tracking_uri.startswith(("http://", "https://")):
        ui = "a tracking server: open it in a browser"
    print(f"storage {summary.storage}; tracking {spec.tracking_uri} ({ui})")
    if summary.crashed_workers:
        crashed = summary.crashed_workers
        print(f"workers {crashed} crashed; run the same command again to finish", file=sys.stderr)
        return 1
    failed = summary.states.get("FAIL", 0)
    if failed and not summary.states.get("COMPLETE") and not summary.states.get("PRUNED"):
        print(
            f"error: every trial of study {summary.study} failed ({failed} FAIL); their reasons: "
            f"harness status {args.spec}",
            file=sys.stderr,
        )
        return 1
    if not args.no_report:
        from pathlib import Path

        from harness.report import report_for_study

        files = report_for_study(spec)
        print(f"report: {Path(files.directory).resolve()}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from harness.spec import load_spec
    from harness.study import status

    spec = load_spec(args.spec).with_overrides(output_dir=args.output_dir, storage=args.storage)
    data = status(spec)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"study {data['study']} ({data['storage']})")
    for column in ("number", "state", "variant", "/".join(data["objectives"]), "MLflow run id", "duration"):
        table.add_column(column)
    for t in data["trials"]:
        values = "" if t["values"] is None else ", ".join(f"{v:.4g}" for v in t["values"])
        duration = "" if t["duration_seconds"] is None else f"{t['duration_seconds']:.1f}s"
        state = t["state"] + (f" ({t['fail_reason']})" if t["fail_reason"] else "")
        row = (str(t["number"]), state, t["variant"] or "", values, t["mlflow_run_id"] or "", duration)
        table.add_row(*(escape(cell) for cell in row))  # "unisd[ema]" is not rich markup
    Console().print(table)
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    import signal

    from harness.spec import load_spec
    from harness.tracking import start_ui, stop_ui, study_ui_url

    def stop_on(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    spec = load_spec(args.spec).with_overrides(output_dir=args.output_dir)
    # `kill PID` or a closed terminal must stop the UI's whole process group as Ctrl-C does; installed
    # before the UI starts, so no signal can slip between its start and the handler.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop_on)
    process = None
    try:
        process, url = start_ui(spec, args.port)
        print(f"MLflow UI for study {spec.name}: {study_ui_url(spec, url)}  (Ctrl-C stops it)", flush=True)
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # a second signal must not cut the cleanup short
        if process is not None:
            stop_ui(process)  # the UI's workers are in its process group: stop them all


def _cmd_eval(args: argparse.Namespace) -> int:
    import re
    import time
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from harness.data import BENCHMARKS
    from harness.evaluation.lmeval import evaluate_model, task_name

    benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    if not benchmarks:
        raise HarnessError(f"--benchmarks is empty; valid benchmarks: {', '.join(sorted(BENCHMARKS))}")
    for name in benchmarks:
        task_name(name, args.scoring)  # unknown names fail here, before the model loads
    if args.limit is not None and args.limit < 1:
        raise HarnessError(f"--limit must be >= 1 (got {args.limit})")
    if args.batch_size < 1:
        raise HarnessError(f"--batch-size must be >= 1 (got {args.batch_size})")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", args.model).strip("-")
    output = Path(args.output) if args.output else Path("runs") / "eval" / slug

    from harness.models import load_model

    console = Console(stderr=True)
    start = time.perf_counter()
    console.print(f"[bold]harness eval[/bold] {args.model} on {', '.join(benchmarks)} (limit {args.limit})")
    model, tokenizer = load_model(args.model, device=args.device)
    result = evaluate_model(
        model,
        tokenizer,
        benchmarks,
        limit=args.limit,
        batch_size=args.batch_size,
        output_dir=output,
        data_dir=args.data_dir,
        scoring=args.scoring,
    )
    wall = time.perf_counter() - start

    table = Table(title=f"{args.model} ({args.scoring})")
    table.add_column("benchmark")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("n", justify="right")
    m = result.metrics
    for name in benchmarks:
        metric = BENCHMARKS[name].metric
        n = m.get(f"{name}.n")
        table.add_row(name, metric, f"{m[f'{name}.{metric}']:.3f}", f"{n:.0f}" if n is not None else "")
    table.add_row("mean", "acc", f"{m['mean.acc']:.3f}", str(len(benchmarks)))
    if "ppl_fit" in m:
        table.add_row("all", "ppl_fit", f"{m['ppl_fit']:.2f}", "")
    Console().print(table)
    console.print(
        f"wall time {wall:.1f} s (evaluation {result.seconds:.1f} s); metrics, samples in {output}/"
    )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness import report

    if args.from_csv:
        if args.spec:
            raise HarnessError("give either a study SPEC or --from-csv FILE, not both")
        if not args.out:
            raise HarnessError("--out DIR is required with --from-csv (where to write the report)")
        files = report.report_from_csv(
            args.from_csv,
            components=report.sources.split_names(args.components, "components"),
            metrics=report.sources.split_names(args.metrics, "metrics"),
            out_dir=Path(args.out),
        )
    else:
        if not args.spec:
            raise HarnessError(
                "give a study SPEC, or --from-csv FILE --components a,b --metrics m1,m2 --out DIR"
            )
        if args.components or args.metrics:
            raise HarnessError("--components/--metrics only apply with --from-csv (a study knows its own)")
        from harness.spec import load_spec

        spec = load_spec(args.spec).with_overrides(output_dir=args.output_dir)
        files = report.report_for_study(spec, out_dir=args.out)
    print(
        f"report written to {files.html} ({len(files.figures)} figures; also report.md, results.csv, effects.json)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness",
        description="Declarative evaluation-and-ablation harness for UniSD self-distillation.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a study spec and summarise it")
    p.add_argument("spec", help="path to a study YAML")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("schema", help="print the JSON Schema of study specs (for editor completion)")
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    p.set_defaults(func=_cmd_schema)

    p = sub.add_parser("run", help="run a study: train, evaluate and log every variant")
    p.add_argument("spec", help="path to a study YAML")
    p.add_argument("--output-dir", help="override the spec's output_dir")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes on this machine")
    p.add_argument(
        "--gpus-per-trial",
        type=int,
        default=1,
        help="train each trial data-parallel over N GPUs (accelerate); training.batch_size is per GPU",
    )
    p.add_argument("--storage", help="Optuna storage URL (e.g. postgresql://...), overrides the spec")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GB",
        help="with --dry-run: check the per-trial memory estimate against this GPU size (default: the GPU seen)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="with --dry-run: one JSON object per trial (model, train_task, variant, seed, params)",
    )
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("status", help="table of a study's trials")
    p.add_argument("spec", help="path to a study YAML")
    p.add_argument("--output-dir", help="override the spec's output_dir")
    p.add_argument("--storage", help="Optuna storage URL, overrides the spec")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("ui", help="start the MLflow UI on the study's tracking store")
    p.add_argument("spec", help="path to a study YAML")
    p.add_argument("--output-dir", help="override the spec's output_dir")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=_cmd_ui)

    p = sub.add_parser("eval", help="score one model on benchmarks, no training")
    p.add_argument(
        "--model", required=True, help="HF id, local dir, bundled:smollm2-135m-instruct, tiny-random:llama"
    )
    p.add_argument("--benchmarks", required=True, help="comma-separated benchmark names")
    p.add_argument("--limit", type=int, default=None, help="examples per benchmark")
    p.add_argument("--output", help="output directory (samples, metrics)")
    p.add_argument("--data-dir", help="local benchmark data (default: $UNISD_DATA_DIR, else the hub)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--scoring", choices=["generative", "loglikelihood"], default="generative")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("report", help="write the component-interaction report of a study")
    p.add_argument("spec", nargs="?", help="path to a study YAML")
    p.add_argument("--output-dir", help="override the spec's output_dir")
    p.add_argument("--from-csv", help="analyse any factorial results table instead of a study")
    p.add_argument("--components", help="with --from-csv: comma-separated 0/1 component columns")
    p.add_argument("--metrics", help="with --from-csv: comma-separated metric columns")
    p.add_argument("--out", help="report directory (default <output_dir>/report/)")
    p.set_defaults(func=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
