"""MBPP, sanitized (Austin et al., 2021): Python functions from a one-line description.

Source: the hub's ``google-research-datasets/mbpp`` (config ``sanitized``) or a local
``<data_dir>/mbpp/sanitized-mbpp.json``. Splits by ``task_id`` as the hub's sanitized config: test
11-510, validation 511-600, train 601-974 (the few-shot "prompt" ids 1-10 are not used). The prompt gives
the description and the first test assert (it fixes the function's name and signature); the
demonstration is the reference code in one python block; ``tests`` is the test imports and all asserts.
"""

from __future__ import annotations

from pathlib import Path

from harness.data.prompts import code_block, user_messages
from harness.data.records import Example
from harness.data.sources import hub_load, local_file, read_json

NAME = "mbpp"
KIND = "code"
SPLITS = ("train", "validation", "test")
HUB_ID = "google-research-datasets/mbpp"
HUB_CONFIG = "sanitized"
PROMPT_VERSION = 1
TRANSFER = ("humaneval",)  # the paper's transfer cell: the MBPP model is also scored on HumanEval
SIZES = {"train": 120, "test": 257}  # approximate split sizes (hub versions), for the plan's estimates

TASK_ID_RANGES = {"test": (11, 510), "validation": (511, 600), "train": (601, 974)}


def _prompt(description: str, first_test: str) -> str:
    return (
        f"{description.strip()}\nYour code should pass this test:\n{first_test.strip()}\n"
        "Write the Python function in one ```python code block."
    )


def _example(row: dict) -> Example:
    tests = "\n".join([*row["test_imports"], *row["test_list"]]) + "\n"
    return Example(
        id=f"{NAME}/{row['task_id']}",
        benchmark=NAME,
        kind=KIND,
        messages=user_messages(_prompt(row["prompt"], row["test_list"][0])),
        demonstration=code_block(row["code"]),
        answer=row["code"],
        tests=tests,
        metadata={"source_id": str(row["task_id"]), "prompt_version": PROMPT_VERSION},
    )


def load_local(folder: Path, split: str) -> list[Example]:
    rows = read_json(local_file(folder, NAME, "sanitized-mbpp.json", hub=f"{HUB_ID} ({HUB_CONFIG})"))
    low, high = TASK_ID_RANGES[split]
    return [_example(row) for row in rows if low <= int(row["task_id"]) <= high]


def load_hub(split: str) -> list[Example]:
    return [_example(row) for row in hub_load(NAME, HUB_ID, HUB_CONFIG, split)]
