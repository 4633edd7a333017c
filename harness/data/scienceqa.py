"""ScienceQA (Lu et al., 2022): science multiple choice, text-only questions.

Source: the hub's ``derek-thomas/ScienceQA`` or a local ``<data_dir>/scienceqa/problems.json`` (the
original pid -> problem file) or ``problems_partial.json`` (the truncated copy in shared/data). Only
problems without an image are used (the paper's setting for text models). Splits are the dataset's own
(``val`` is ``validation``). The demonstration is the lecture-free ``solution`` followed by the answer
line; 105 text-only problems of the local copy have an empty solution and get the answer line alone.
"""

from __future__ import annotations

from pathlib import Path

from harness.data.prompts import LETTERS, mc_demonstration, mc_prompt, user_messages
from harness.data.records import Example
from harness.data.sources import hub_load, local_file, read_json

NAME = "scienceqa"
KIND = "multiple_choice"
SPLITS = ("train", "validation", "test")
HUB_ID = "derek-thomas/ScienceQA"
HUB_CONFIG = None
PROMPT_VERSION = 1
TRANSFER = ("gpqa",)  # the paper's transfer cell: the ScienceQA model is also scored on GPQA
SIZES = {"train": 12726, "test": 4241}  # approximate split sizes (hub versions), for the plan's estimates

_LOCAL_SPLIT = {"train": "train", "validation": "val", "test": "test"}


def _example(source_id: str, problem: dict) -> Example:
    choices = tuple(problem["choices"])
    letter = LETTERS[int(problem["answer"])]
    return Example(
        id=f"{NAME}/{source_id}",
        benchmark=NAME,
        kind=KIND,
        messages=user_messages(mc_prompt(problem["question"], choices, context=problem.get("hint") or "")),
        demonstration=mc_demonstration(problem.get("solution") or "", letter),
        answer=letter,
        choices=choices,
        metadata={
            "source_id": source_id,
            "subject": problem.get("subject", ""),
            "topic": problem.get("topic", ""),
            "category": problem.get("category", ""),
            "grade": problem.get("grade", ""),
            "prompt_version": PROMPT_VERSION,
        },
    )


def load_local(folder: Path, split: str) -> list[Example]:
    path = local_file(folder, NAME, "problems.json", "problems_partial.json", hub=HUB_ID)
    problems: dict[str, dict] = read_json(path)
    wanted = _LOCAL_SPLIT[split]
    return [
        _example(pid, p) for pid, p in problems.items() if p.get("image") is None and p["split"] == wanted
    ]


def load_hub(split: str) -> list[Example]:
    import datasets

    rows = hub_load(NAME, HUB_ID, HUB_CONFIG, split)
    # Undecoded images: we only need to know whether one exists, not to build PIL objects.
    rows = rows.cast_column("image", datasets.Image(decode=False))
    return [_example(f"{split}-{i}", row) for i, row in enumerate(rows) if row["image"] is None]
