"""Score an in-memory model with lm-eval on our tasks, then add PPL fit and retention.

Why these choices (integration-notes.md, lm-eval section):

- lm-eval refuses a raw transformers model: it is wrapped in ``HFLM(pretrained=model, tokenizer=...)``,
  which takes the device from the model (no ``device`` argument: passing it twice raises).
- Our tasks only: ``TaskManager(include_path=[tasks/, ...], include_defaults=False)`` (plus the task
  folders of benchmarks registered outside the package); their loaders read
  ``limit`` / ``seed`` / ``data_dir`` / ``split`` from the task metadata, so the docs are the seeded subset
  the rest of the harness uses (lm-eval's own ``limit`` would take the first N).
- lm-eval's response cache is keyed on the request only, not the model: it lives in ``output_dir``
  (one per variant), never in a shared place, or one variant would be scored on another's answers.
- ``log_samples`` is set explicitly (the Python API defaults to True, the CLI to False); samples are
  written as one JSONL file, ``samples.jsonl``.
- Metric keys such as ``acc,none`` / ``pass_at_1,sandbox`` are normalised to ``scienceqa.acc`` /
  ``mbpp.pass_at_1`` (MLflow rejects commas); ``mean.acc`` is the mean of the benchmarks' primary scores.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.data.registry import SCORINGS
from harness.errors import HarnessError
from harness.evaluation.quiet_git import silence_lm_eval_git
from harness.jsonable import jsonable
from harness.metric_names import normalise_metric_name
from unisd_components.generation import stated_decoding
from unisd_components.lora import adapters_folded
from unisd_components.prefill import prefills_kept

__all__ = [
    "SCORINGS",
    "EvalResult",
    "evaluate_model",
    "normalise_metrics",
    "question_errors",
    "task_name",
    "task_paths",
]



@dataclass
class EvalResult:
    """``metrics``: normalised name -> value; ``samples_path``: the per-sample JSONL (None if none)."""

    metrics: dict[str, float]
    samples_path: Path | None
    seconds: float


def task_name(benchmark: str, scoring: str = "generative") -> str:
    """The lm-eval task of a benchmark under ``scoring``, from its record in :data:`harness.data.BENCHMARKS`
    (``unisd_<b>``, or ``unisd_<b>_ll`` for log-likelihood multiple choice)."""
    from harness.data import BENCHMARKS

    if benchmark not in BENCHMARKS:
        raise HarnessError(
            f"unknown benchmark {benchmark!r}; valid benchmarks: {', '.join(sorted(BENCHMARKS))}"
        )
    return BENCHMARKS[benchmark].task(scoring)


def task_paths() -> list[str]:
    """The folders lm-eval must scan: our task folder, and those of benchmarks registered elsewhere."""
    from harness.data import BENCHMARKS
    from harness.evaluation.tasks import TASKS_DIR

    extra = [b.task_dir for b in BENCHMARKS.values() if b.task_dir and not b.task_dir.is_relative_to(TASKS_DIR)]
    return [str(TASKS_DIR), *dict.fromkeys(str(p) for p in extra)]


def normalise_metrics(results: dict[str, dict[str, Any]], tasks: dict[str, str]) -> dict[str, float]:
    """lm-eval's ``results`` (task -> ``{"acc,none": ...}``) as ``{"<benchmark>.<metric>": value}``.

    ``tasks`` maps task name -> benchmark. Standard errors and aliases are dropped; a metric reported under
    one filter loses the filter's name (``pass_at_1,sandbox`` -> ``pass_at_1``), see
    :mod:`harness.metric_names`. Adds ``mean.acc``, the mean of the benchmarks' primary scores.
    """
    from harness.data import BENCHMARKS

    metrics: dict[str, float] = {}
    primaries = []
    for task, benchmark in tasks.items():
        scores = {
            key: value
            for key, value in results.get(task, {}).items()
            if key != "alias" and not key.split(",")[0].endswith("_stderr") and isinstance(value, int | float)
        }
        heads = [key.split(",")[0] for key in scores]
        for key, value in scores.items():
            head = key.split(",")[0]
            name = normalise_metric_name(key, drop_filter=heads.count(head) == 1)
            name = "n" if name == "sample_len" else name  # lm-eval's count of scored docs
            metrics[f"{benchmark}.{name}"] = float(value)
        primary = f"{benchmark}.{BENCHMARKS[benchmark].metric}"
        if primary not in metrics:
            raise RuntimeError(
                f"lm-eval returned no {primary} for task {task}: {sorted(results.get(task, {}))}"
            )
        primaries.append(metrics[primary])
    if primaries:
        metrics["mean.acc"] = sum(primaries) / len(primaries)
    return metrics


def question_errors(samples: dict[str, list[dict]], tasks: dict[str, str]) -> dict[str, float]:
    """Per-question standard errors: ``<benchmark>.<metric>_se`` = sample std (n − 1) / √n of the
    per-question scores, and ``mean.acc_se`` = √(Σ se²) / B over the B benchmarks' primary scores
    (the benchmarks' questions are independent). Why: a benchmark score from 12 or 500 questions carries
    a sampling error that the seed spread does not show; the report and reports/README.md use these.
    """
    from harness.data import BENCHMARKS
    from harness.report.paired import question_se

    errors: dict[str, float] = {}
    primaries = []
    for task, benchmark in tasks.items():
        rows = samples.get(task, [])
        names = dict.fromkeys(m for sample in rows for m in sample.get("metrics", []))
        for name in names:
            values = [float(s[name]) for s in rows if isinstance(s.get(name), int | float)]  # bools too
            if len(values) > 1:
                errors[f"{benchmark}.{name}_se"] = question_se(values)
        primary = f"{benchmark}.{BENCHMARKS[benchmark].metric}_se"
        primaries.append(errors.get(primary, float("nan")))
    if primaries and all(math.isfinite(e) for e in primaries):
        errors["mean.acc_se"] = math.sqrt(sum(e * e for e in primaries)) / len(primaries)
    return errors


def _write_samples(path: Path, samples: dict[str, list[dict]], tasks: dict[str, str]) -> int:
    """One line per (task, doc): ids, the rendered prompt, the raw and filtered responses, the scores."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for task, benchmark in tasks.items():
            for sample in samples.get(task, []):
                doc = sample["doc"]
                arguments = sample.get("arguments") or [[""]]
                line = {
                    "benchmark": benchmark,
                    "task": task,
                    "id": doc["id"],
                    "doc_id": sample["doc_id"],
                    "prompt": arguments[0][0] if arguments and arguments[0] else "",
                    "response": jsonable(sample["resps"]),
                    "filtered": jsonable(sample["filtered_resps"]),
                    "filter": sample.get("filter"),
                    "target": jsonable(sample.get("target")),
                    "scores": {m: jsonable(sample[m]) for m in sample.get("metrics", []) if m in sample},
                }
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
                count += 1
    return count


def _generated_completions(
    samples: dict[str, list[dict]], tasks: dict[str, str], examples
) -> list[str] | None:
    """The evaluated model's greedy completions lm-eval already produced, in ``examples`` order.

    None when any example has no generation (log-likelihood scoring): retention then generates its own.
    Code answers get back the opening fence lm-eval prefilled, so the text is what the model "said".
    """
    from harness.evaluation.tasks._common import CODE_PREFIX

    by_id: dict[str, str] = {}
    for task in tasks:
        for sample in samples.get(task, []):
            resps = sample["resps"]
            if not resps or not resps[0] or not isinstance(resps[0][0], str):
                return None
            prefix = CODE_PREFIX if sample["doc"]["kind"] == "code" else ""
            by_id[sample["doc"]["id"]] = prefix + resps[0][0]
    if any(ex.id not in by_id for ex in examples):
        return None
    return [by_id[ex.id] for ex in examples]


def _base_completions(
    model, base_model, tokenizer, benchmarks, examples, own, cache_dir: Path | None, settings: dict
) -> list[list[int]]:
    """The base model's completions for ``ppl_ret_reverse``, with one definition whatever the trial order:
    the base model's own lm-eval completions (the same rule as the evaluated model's, re-tokenized).

    Read from ``cache_dir`` (one JSON file per base model, benchmark, prompt version and settings); what
    is missing comes from this evaluation when it evaluates the base model itself (no second pass), else
    from an lm-eval evaluation of the base model with the same settings.
    """
    from harness.evaluation.retention import model_fingerprint

    def from_base_evaluation() -> list[list[int]]:
        if model is base_model:
            return [list(c) for c in own]
        with tempfile.TemporaryDirectory(prefix="unisd-base-eval-") as tmp:
            result = evaluate_model(
                base_model, tokenizer, benchmarks, output_dir=Path(tmp), ppl_fit=False, retention=False,
                **settings,
            )  # fmt: skip
            texts = _texts_by_id(result.samples_path, examples)
        return [tokenizer(texts[ex.id], add_special_tokens=False)["input_ids"] for ex in examples]

    if cache_dir is None:
        return from_base_evaluation()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = model_fingerprint(base_model)
    tag = f"n{settings['max_gen_tokens']}-b{settings['batch_size']}-{settings['scoring']}"

    def path_of(ex) -> Path:
        version = ex.metadata.get("prompt_version", 0)
        return cache_dir / f"base-lm-eval-completions-{fingerprint}-{ex.benchmark}-v{version}-{tag}.json"

    files = {path: json.loads(path.read_text()) if path.is_file() else {} for path in map(path_of, examples)}
    if any(ex.id not in files[path_of(ex)] for ex in examples):
        fresh = from_base_evaluation()
        for ex, tokens in zip(examples, fresh, strict=True):
            files[path_of(ex)].setdefault(ex.id, tokens)
        for path, entries in files.items():
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(entries))
            tmp.replace(path)  # atomic: a concurrent reader sees the old or the new file, never half
    return [files[path_of(ex)][ex.id] for ex in examples]


def _texts_by_id(samples_path: Path | None, examples) -> dict[str, str]:
    """Completions from an evaluation's ``samples.jsonl``, as :func:`_generated_completions` reads them."""
    from harness.evaluation.tasks._common import CODE_PREFIX

    kinds = {ex.id: ex.kind for ex in examples}
    texts: dict[str, str] = {}
    if samples_path is not None:
        for line in samples_path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row["id"] in kinds:
                texts[row["id"]] = (CODE_PREFIX if kinds[row["id"]] == "code" else "") + row["response"][0][0]
    missing = [ex.id for ex in examples if ex.id not in texts]
    if missing:
        raise RuntimeError(f"the base model's evaluation produced no completion for {missing[:3]}")
    return texts


def _preserving_rng(function):
    """Run ``function`` without touching the caller's random streams (Python, NumPy, torch CPU/CUDA).

    lm-eval seeds every global generator with the evaluation seed; a dev evaluation in the middle of
    training would otherwise re-seed the trial's sampling (issue 11 item 6), so a pruned run would train
    differently from an unpruned one.
    """

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        import numpy as np
        import torch

        python_state, numpy_state = random.getstate(), np.random.get_state()
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=devices):
                return function(*args, **kwargs)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    return wrapper


@_preserving_rng
def evaluate_model(
    model,
    tokenizer,
    benchmarks: Sequence[str],
    *,
    split: str = "test",
    limit: int | None,
    batch_size: int,
    output_dir: Path,
    data_dir: str | Path | None = None,
    seed: int = 0,
    scoring: str = "generative",
    max_gen_tokens: int = 256,
    base_model=None,
    ppl_fit: bool = True,
    retention: bool = True,
    cache_dir: Path | None = None,
    engine=None,
) -> EvalResult:
    """Score ``model`` (already on its device, in eval mode) on ``benchmarks``.

    Args:
        model, tokenizer: The in-memory model and its tokenizer. The chat template is applied when the
            tokenizer has one (instruct models), as in training.
        benchmarks: Names of :data:`harness.data.BENCHMARKS`.
        split, limit, seed, data_dir: Which docs: a seeded subset of ``limit`` examples of ``split``
            per benchmark (``load_benchmark`` semantics).
        batch_size: Generation / scoring batch size. Decoding is greedy.
        output_dir: This variant's folder: ``samples.jsonl``, ``metrics.json`` and the lm-eval response
            cache (``lm_eval_cache/``) go here. Never share it between variants.
        scoring: ``generative`` (letter extraction, the paper's setting) or ``loglikelihood`` (option
            texts; multiple-choice benchmarks only, the others stay generative).
        max_gen_tokens: Generation budget of every generative task and of retention's completions.
        base_model: The untrained model; when given (and ``retention``), adds ``ppl_ret``, ``ret_jsd``
            and ``ppl_ret_reverse``, pooled and per benchmark (``<bench>.ppl_ret`` ...; base completions
            generated greedily once and cached in ``cache_dir``). The evaluated model's
            greedy completions are the ones lm-eval just generated (re-tokenized text, cut at the task's
            stop sequences), not a second generation pass; log-likelihood scoring generates them.
        ppl_fit: Add ``ppl_fit`` (gold-demonstration perplexity, token-weighted over all benchmarks).
        engine: A :class:`unisd_components.vllm_engine.VLLMEngine` on the same base model: ``model``'s
            weights are pushed into it and lm-eval's ``vllm`` model generates and scores through it (same
            tasks, prompts and greedy rule; see :mod:`harness.evaluation.vllm_lm`). PPL fit and retention
            stay forward passes of ``model``. None: lm-eval's ``HFLM`` on ``model``.

    lm-eval seeds Python's, NumPy's and torch's global generators with ``seed`` on the way in; their
    states are restored on the way out, so evaluating never changes the caller's random streams.

    Returns:
        :class:`EvalResult` with metrics named ``<benchmark>.acc`` / ``<benchmark>.pass_at_1``,
        ``mean.acc``, ``ppl_fit``, ``ppl_ret``, ``ret_jsd``, ``ppl_ret_reverse``.
    """
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    from harness.data import load_benchmark
    from harness.evaluation import retention as retention_mod
    from harness.evaluation.hf_lm import BucketedHFLM

    start = time.perf_counter()
    if not benchmarks:
        raise HarnessError("no benchmarks to evaluate")
    if len(set(benchmarks)) != len(benchmarks):
        raise HarnessError(f"benchmarks listed twice: {', '.join(benchmarks)}")
    tasks = {task_name(b, scoring): b for b in benchmarks}
    if max_gen_tokens < 1:
        raise HarnessError(f"max_gen_tokens must be >= 1 (got {max_gen_tokens})")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "lm_eval_cache").mkdir(exist_ok=True)

    # lm-eval warns on every call about in-memory models and task metadata, which is how we use it on
    # purpose; its progress bars stay.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    # The evaluated model's prompts, prefilled for its generation, serve retention's scoring too.
    with prefills_kept(model):
        if engine is not None:
            from harness.evaluation.vllm_lm import EngineLM

            engine.load_policy(model)
            lm = EngineLM(engine, tokenizer, batch_size="auto", max_gen_toks=max_gen_tokens)
        else:
            lm = BucketedHFLM(
                pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_gen_toks=max_gen_tokens
            )
        task_manager = TaskManager(
            include_path=task_paths(),
            include_defaults=False,
            metadata={
                "limit": limit,
                "seed": seed,
                "split": split,
                "data_dir": str(data_dir) if data_dir is not None else None,
            },
        )
        chat = bool(getattr(tokenizer, "chat_template", None))
        silence_lm_eval_git()  # no "fatal: not a git repository" outside a checkout
        # Greedy under one stated rule (no generation_config option leaks in); a LoRA model (an evaluation
        # during training) runs with its adapter folded into its weights.
        with torch.no_grad(), stated_decoding(model), adapters_folded(model):
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                task_manager=task_manager,
                log_samples=True,
                use_cache=str(output_dir / "lm_eval_cache" / "responses"),
                apply_chat_template=chat,
                gen_kwargs={"max_gen_toks": max_gen_tokens, "do_sample": False},
                bootstrap_iters=0,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        if engine is not None:
            engine.sleep()  # CUDA: retention, PPL fit and the next training get the engine's memory back
        metrics = normalise_metrics(results["results"], tasks)
        samples = results.get("samples", {})
        metrics.update(question_errors(samples, tasks))
        samples_path = output_dir / "samples.jsonl"
        if _write_samples(samples_path, samples, tasks) == 0:
            samples_path = None

        if ppl_fit or (retention and base_model is not None):
            examples = [
                ex
                for b in benchmarks
                for ex in load_benchmark(b, split, data_dir=data_dir, limit=limit, seed=seed)
            ]
            with_retention = retention and base_model is not None
            if ppl_fit and not with_retention:
                metrics["ppl_fit"] = retention_mod.ppl_fit(model, tokenizer, examples, batch_size=batch_size)
            if with_retention:
                texts = _generated_completions(samples, tasks, examples)
                completions = (
                    [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
                    if texts is not None
                    else None
                )
                base_completions = None
                if completions is not None:
                    settings = dict(
                        split=split, limit=limit, batch_size=batch_size, data_dir=data_dir, seed=seed,
                        scoring=scoring, max_gen_tokens=max_gen_tokens,
                    )  # fmt: skip
                    base_completions = _base_completions(
                        model, base_model, tokenizer, benchmarks, examples, completions, cache_dir, settings
                    )
                metrics.update(
                    retention_mod.retention(
                        model,
                        base_model,
                        tokenizer,
                        examples,
                        max_new_tokens=max_gen_tokens,
                        cache_dir=cache_dir,
                        batch_size=batch_size,
                        completions=completions,
                        with_ppl_fit=ppl_fit,  # the gold demonstrations share the prompts' forward pass
                        base_completions=base_completions,
                    )
                )
    seconds = time.perf_counter() - start
    (output_dir / "metrics.json").write_text(json.dumps({"metrics": metrics, "seconds": seconds}, indent=2))
    return EvalResult(metrics=metrics, samples_path=samples_path, seconds=seconds)
