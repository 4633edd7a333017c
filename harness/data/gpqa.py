"""GPQA diamond (Rein et al., 2023): graduate science multiple choice, evaluation only.

Source: the hub's gated ``Idavidrein/gpqa`` (config ``gpqa_diamond``) or a local
``<data_dir>/gpqa/gpqa_diamond.csv`` (same columns). The four options are shuffled with a random seed
derived from the question's ``Record ID``, so the correct letter is fixed per question and spread
over A-D. Only ``test`` exists. The demonstration (the writer's explanation, then the answer line) is
kept for completeness; GPQA is never trained on.

Its authors ask that the questions stay out of plain text on the web: never log or commit them
(``Example``'s repr leaves the text out).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from harness.data.prompts import LETTERS, mc_demonstration, mc_prompt, user_messages
from harness.data.records import Example
from harness.data.sources import hub_load, local_file, stable_hash

NAME = "gpqa"
KIND = "multiple_choice"
SPLITS = ("test",)
HUB_ID = "Idavidrein/gpqa"
HUB_CONFIG = "gpqa_diamond"
PROMPT_VERSION = 1
SIZES = {"test": 198}  # approximate split sizes (hub versions), for the plan's estimates


def _example(row: dict) -> Example:
    record_id = row["Record ID"].strip()
    correct = row["Correct Answer"].strip()
    options = [correct] + [row[f"Incorrect Answer {i}"].strip() for i in (1, 2, 3)]
    random.Random(stable_hash(f"gpqa-options:{record_id}")).shuffle(options)
    letter = LETTERS[options.index(correct)]
    choices = tuple(options)
    return Example(
        id=f"{NAME}/{record_id}",
        benchmark=NAME,
        kind=KIND,
        messages=user_messages(mc_prompt(row["Question"], choices)),
        demonstration=mc_demonstration(row.get("Explanation") or "", letter),
        answer=letter,
        choices=choices,
        metadata={
            "source_id": record_id,
            "domain": row.get("High-level domain", ""),
            "subdomain": row.get("Subdomain", ""),
            "prompt_version": PROMPT_VERSION,
        },
    )


def load_local(folder: Path, split: str) -> list[Example]:
    path = local_file(folder, NAME, "gpqa_diamond.csv", hub=f"{HUB_ID} ({HUB_CONFIG})")
    with open(path, newline="", encoding="utf-8") as f:
        return [_example(row) for row in csv.DictReader(f)]


def load_hub(split: str) -> list[Example]:
    return [_example(row) for row in hub_load(NAME, HUB_ID, HUB_CONFIG, "train")]
