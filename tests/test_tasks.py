"""The lm-eval task definitions: they load, their docs are the data layer's examples, gold answers score 1.

Everything goes through the real lm-eval TaskManager on shared/data ($UNISD_DATA_DIR); the CLI test runs
the real ``lm_eval`` command on a tiny random model saved to a temporary folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.data import BENCHMARKS, load_benchmark
from harness.data.prompts import MC_INSTRUCTION
from harness.evaluation.retention import render_prompt
from harness.evaluation.tasks import TASKS_DIR
from harness.evaluation.tasks._common import CODE_PREFIX, LL_INSTRUCTION, sandbox_filter
from unisd_components.chat import encode_prompt

LIMIT = 4
ALL_TASKS = [f"unisd_{b}" for b in BENCHMARKS] + [
    f"unisd_{b}_ll" for b, spec in BENCHMARKS.items() if spec.kind == "multiple_choice"
]


@pytest.fixture(scope="module")
def loaded_tasks(data_dir):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(
        include_path=str(TASKS_DIR), include_defaults=False, metadata={"limit": LIMIT, "seed": 3}
    )
    return manager.load(ALL_TASKS)["tasks"]


def _benchmark(task: str) -> str:
    return task.removeprefix("unisd_").removesuffix("_ll")


def test_every_task_is_registered(loaded_tasks):
    assert sorted(loaded_tasks) == sorted(ALL_TASKS)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_docs_are_the_data_layer_examples(loaded_tasks, task, data_dir):
    lm_task = loaded_tasks[task]
    examples = load_benchmark(_benchmark(task), "test", data_dir=data_dir, limit=LIMIT, seed=3)
    docs = list(lm_task.test_docs())
    assert [d["id"] for d in docs] == [ex.id for ex in examples]
    for doc, ex in zip(docs, examples, strict=True):
        if task.endswith("_ll"):
            # Same prompt, asking for the option's text instead of an explanation and a letter.
            assert lm_task.doc_to_text(doc) == ex.prompt_text().replace(MC_INSTRUCTION, LL_INSTRUCTION)
            assert lm_task.doc_to_text(doc) != ex.prompt_text()
            choices = lm_task.doc_to_choice(doc)
            assert choices == list(ex.choices)  # the option texts, not letters
            assert "ABCDEFGHIJ"[lm_task.doc_to_target(doc)] == ex.answer
        else:
            assert lm_task.doc_to_text(doc) == ex.prompt_text()
            assert lm_task.doc_to_target(doc) == ex.answer


def test_chat_rendering_matches_training(loaded_tasks, bundled_tokenizer, data_dir):
    """lm-eval's chat-templated context is the prompt retention (and training) renders."""
    lm_task = loaded_tasks["unisd_scienceqa"]
    doc = next(iter(lm_task.test_docs()))
    ex = load_benchmark("scienceqa", "test", data_dir=data_dir, limit=LIMIT, seed=3)[0]

    def template(history, add_generation_prompt=True):
        return bundled_tokenizer.apply_chat_template(
            history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    context = lm_task.fewshot_context(doc, num_fewshot=0, apply_chat_template=True, chat_template=template)
    assert context == render_prompt(bundled_tokenizer, ex.messages)
    # and the trainer's encoder turns the training record of the same example into the same tokens
    training_ids = encode_prompt(bundled_tokenizer, ex.to_training_example().messages, limit=4096)
    assert training_ids == bundled_tokenizer(context, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("task", ["unisd_scienceqa", "unisd_gpqa", "unisd_cos_e"])
def test_multiple_choice_gold_scores_one_and_wrong_zero(loaded_tasks, task):
    lm_task = loaded_tasks[task]
    for doc in lm_task.test_docs():
        assert lm_task.process_results(doc, [doc["demonstration"]]) == {"acc": 1.0}
        wrong = next(letter for letter in "ABCD" if letter != doc["answer"])
        assert lm_task.process_results(doc, [f"The answer is ({wrong})."]) == {"acc": 0.0}
        assert lm_task.process_results(doc, [""]) == {"acc": 0.0}


@pytest.mark.parametrize("task", ["unisd_mbpp", "unisd_humaneval"])
def test_code_canonical_solutions_pass_wrong_fail(loaded_tasks, task):
    lm_task = loaded_tasks[task]
    docs = list(lm_task.test_docs())
    # What the model would write after the prefilled opening fence: the gold block minus that fence.
    gold = [[doc["demonstration"].removeprefix(CODE_PREFIX)] for doc in docs]
    statuses = sandbox_filter(gold, docs)
    assert statuses == ["passed"] * len(docs)
    assert all(
        lm_task.process_results(d, [s]) == {"pass_at_1": 1.0} for d, s in zip(docs, statuses, strict=True)
    )
    bad = sandbox_filter([[""] for _ in docs] + [["def nothing():\n    return None\n```"]], docs + docs[:1])
    assert all(s != "passed" for s in bad)
    assert all(
        lm_task.process_results(d, [s]) == {"pass_at_1": 0.0}
        for d, s in zip(docs + docs[:1], bad, strict=True)
    )


def test_tool_call_gold_scores_one(loaded_tasks):
    lm_task = loaded_tasks["unisd_toolalpaca"]
    for doc in lm_task.test_docs():
        golden_parsed = json.loads(doc["metadata"])["golden_parsed"]
        if golden_parsed:
            assert lm_task.process_results(doc, [doc["demonstration"]]) == {"acc": 1.0}
        assert lm_task.process_results(doc, ["Action: noSuchFunction\nAction Input: {}"]) == {"acc": 0.0}
        assert lm_task.process_results(doc, [""]) == {"acc": 0.0}


def test_limit_is_a_seeded_subset(data_dir):
    from harness.evaluation.tasks._common import load_docs

    first = load_docs("cos_e", limit=5, seed=1)["test"]["id"]
    again = load_docs("cos_e", limit=5, seed=1)["test"]["id"]
    other = load_docs("cos_e", limit=5, seed=2)["test"]["id"]
    assert first == again and len(first) == 5 and first != other


def test_lm_eval_cli_runs_our_task(tmp_path, tiny_model_and_tokenizer, data_dir):
    """``lm_eval --include_path harness/evaluation/tasks`` works with no harness code on the call path."""
    model, tokenizer = tiny_model_and_tokenizer
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    lm_eval_bin = Path(sys.executable).with_name("lm_eval")
    env = {**os.environ, "UNISD_DATA_DIR": str(data_dir)}
    cmd = [
        str(lm_eval_bin),
        "--model", "hf",
        "--model_args", f"pretrained={tmp_path / 'model'},dtype=float32",
        "--device", "cpu",
        "--include_path", str(TASKS_DIR),
        "--tasks", "unisd_scienceqa,unisd_cos_e_ll",
        "--apply_chat_template",
        "--gen_kwargs", "max_gen_toks=4",
        "--metadata", json.dumps({"limit": 2, "seed": 0}),
        "--batch_size", "2",
        "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert set(results["results"]) == {"unisd_scienceqa", "unisd_cos_e_ll"}
    for task in ("unisd_scienceqa", "unisd_cos_e_ll"):
        assert 0.0 <= results["results"][task]["acc,none"] <= 1.0
        assert results["n-samples"][task]["effective"] == 2
