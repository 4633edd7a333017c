"""HumanEval (Chen et al., 2021): complete a Python function from its signature and docstring.

Source: the hub's ``openai/openai_humaneval`` or a local ``<data_dir>/humaneval/HumanEval.jsonl.gz``
(``HumanEval.jsonl`` also accepted). Evaluation only (``test``). The model is asked for the complete
function (imports included) in one python block; ``answer`` is ``prompt + canonical_solution``, and
``tests`` is ``test + check(entry_point)``, so ``answer + "\\n" + tests`` is a passing program.
``metadata["prompt_code"]`` keeps the original prompt (its imports) for scorers that prepend it.
"""

from __future__ import annotations

from pathlib import Path

from harness.data.prompts import code_block, user_messages
from harness.data.records import Example
from harness.data.sources import hub_load, local_file, read_jsonl

NAME = "humaneval"
KIND = "code"
SPLITS = ("test",)
HUB_ID = "openai/openai_humaneval"
HUB_CONFIG = None
PROMPT_VERSION = 1
SIZES = {"test": 164}  # approximate split sizes (hub versions), for the plan's estimates


def _prompt(code: str) -> str:
    return (
        "Complete the following Python function. Reply with the complete function (imports, signature, "
        f"docstring and body) in one ```python code block.\n{code_block(code)}"
    )


def _example(row: dict) -> Example:
    program = row["prompt"] + row["canonical_solution"]
    return Example(
        id=f"{NAME}/{row['task_id'].split('/')[-1]}",
        benchmark=NAME,
        kind=KIND,
        messages=user_messages(_prompt(row["prompt"])),
        demonstration=code_block(program),
        answer=program,
        tests=f"{row['test']}\ncheck({row['entry_point']})\n",
        metadata={
            "source_id": row["task_id"],
            "entry_point": row["entry_point"],
            "prompt_code": row["prompt"],
            "prompt_version": PROMPT_VERSION,
        },
    )


def load_local(folder: Path, split: str) -> list[Example]:
    return [
        _example(row)
        for row in read_jsonl(local_file(folder, NAME, "HumanEval.jsonl.gz", "HumanEval.jsonl", hub=HUB_ID))
    ]


def load_hub(split: str) -> list[Example]:
    return [_example(row) for row in hub_load(NAME, HUB_ID, HUB_CONFIG, "test")]
