"""What every UniSD lm-eval task shares: docs built from ``harness.data`` and the per-kind scoring.

The docs come from :func:`harness.data.load_benchmark`, so an evaluated prompt is byte for byte the
prompt the trainer saw (lm-eval wraps ``doc["prompt"]`` in a single user turn and applies the model's chat
template when ``apply_chat_template`` is on, exactly as training renders ``Example.messages``).

Loader options arrive as lm-eval task metadata (``TaskManager(metadata=...)`` or the CLI's
``--metadata '{"limit": 20}'``), else from the environment:

- ``data_dir``: local data root (else ``$UNISD_DATA_DIR``, else the hub id), as ``load_benchmark``.
- ``limit`` (``$UNISD_EVAL_LIMIT``): a seeded subset of this many docs, the same subset the harness
  uses everywhere (unlike lm-eval's ``--limit``, which takes the first N).
- ``seed`` (``$UNISD_EVAL_SEED``, default 0), ``split`` (``$UNISD_EVAL_SPLIT``, default ``test``).
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = [
    "CODE_PREFIX",
    "LL_INSTRUCTION",
    "doc_from_example",
    "load_docs",
    "process_code",
    "process_multiple_choice",
    "process_tool_call",
    "sandbox_filter",
]

# The assistant turn of a code task starts with the fence already open (lm-eval ``gen_prefix``), and
# generation stops at the closing fence: the canonical answer format, without the wasted tokens.
CODE_PREFIX = "```python\n"
_SANDBOX_TIMEOUT = 10.0
LL_INSTRUCTION = "Answer with the text of the correct option."


def _option(metadata: dict[str, Any], key: str, env: str, default: Any = None) -> Any:
    value = metadata.get(key)
    if value is None or value == "":
        value = os.environ.get(env) or default
    return value


def doc_from_example(example) -> dict[str, Any]:
    """One flat, Arrow-friendly doc per :class:`harness.data.Example`."""
    from harness.data.prompts import LETTERS, MC_INSTRUCTION

    # A system message (the data layer writes none today) is kept by folding it into the user text:
    # lm-eval has one system instruction per run, not one per doc.
    prompt = "\n\n".join(m["content"] for m in example.messages if m["role"] in ("system", "user"))
    target_index = LETTERS.index(example.answer) if example.kind == "multiple_choice" else -1
    # Log-likelihood scoring continues the prompt with an option's text: ask for exactly that, instead of
    # the generative "explain, then end with The answer is (X)" instruction.
    prompt_ll = prompt.replace(MC_INSTRUCTION, LL_INSTRUCTION) if example.kind == "multiple_choice" else ""
    return {
        "id": example.id,
        "benchmark": example.benchmark,
        "kind": example.kind,
        "prompt": prompt,
        "prompt_ll": prompt_ll,
        "demonstration": example.demonstration,
        "answer": example.answer,
        "choices": list(example.choices),
        "target_index": target_index,
        "tests": example.tests,
        "metadata": json.dumps(example.metadata, sort_keys=True, default=str),
    }


def load_docs(benchmark: str, **metadata: Any):
    """``{"test": datasets.Dataset}`` of one benchmark's docs (see the module docstring for options).

    lm-eval calls this through each task's ``custom_dataset``; the key is always ``test`` (the task's
    ``test_split``) whatever split was loaded.
    """
    import datasets

    from harness.data import load_benchmark

    limit = _option(metadata, "limit", "UNISD_EVAL_LIMIT")
    seed = _option(metadata, "seed", "UNISD_EVAL_SEED", 0)
    split = _option(metadata, "split", "UNISD_EVAL_SPLIT", "test")
    examples = load_benchmark(
        benchmark,
        split,
        data_dir=metadata.get("data_dir") or None,
        limit=int(limit) if limit is not None else None,
        seed=int(seed),
    )
    if not examples:
        raise ValueError(f"{benchmark}: no {split} examples (limit={limit})")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([doc_from_example(e) for e in examples])})


def process_multiple_choice(doc: dict, results: list[str]) -> dict[str, float]:
    """Generative multiple choice: the extracted letter must be the gold letter."""
    from harness.evaluation.metrics import extract_choice_letter

    letter = extract_choice_letter(results[0], len(doc["choices"]))
    return {"acc": float(letter == doc["answer"])}


def code_program(doc: dict, response: str) -> str:
    """The program a code completion stands for: the extracted code, then the benchmark's tests.

    The response is what followed the prefilled opening fence; the fence is put back (and closed) so
    ``metrics.build_program`` sees the canonical block whether or not generation reached its end.
    """
    from harness.evaluation.metrics import build_program

    entry_point = json.loads(doc["metadata"]).get("entry_point")
    return build_program(CODE_PREFIX + response + "\n```", doc["tests"], entry_point)


def sandbox_filter(resps: list[list[str]], docs: list[dict]) -> list[str]:
    """lm-eval ``custom`` filter: run every doc's candidate program in the sandbox, all in parallel.

    Keeps the first (greedy, the only) response of each doc, as lm-eval's ``take_first`` does, and
    replaces it by its sandbox status (``passed``, ``failed``, ``timeout``, ``error``), so the per-sample
    log shows why a sample failed; ``process_code`` turns the status into pass@1.
    """
    from harness.evaluation.sandbox import run_programs

    sources = [code_program(doc, rs[0] if rs else "") for doc, rs in zip(docs, resps, strict=True)]
    return [outcome.status for outcome in run_programs(sources, timeout=_SANDBOX_TIMEOUT)]


def process_code(doc: dict, results: list[str]) -> dict[str, float]:
    """pass@1 of the greedy completion: ``results`` is ``[status]`` from :func:`sandbox_filter`."""
    return {"pass_at_1": float(results[0] == "passed")}


def process_tool_call(doc: dict, results: list[str]) -> dict[str, float]:
    """Tool-call accuracy: every step's function name and parsed arguments match the golden steps."""
    from harness.evaluation.metrics import tool_call_correct

    return {"acc": float(tool_call_correct(results[0], doc["answer"]))}
