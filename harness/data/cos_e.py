"""CoS-E (Rajani et al., 2019): CommonsenseQA questions with human explanations as rationales.

Source: a local ``<data_dir>/cos_e/`` holding CommonsenseQA v1.0 (``train_rand_split.jsonl``,
``dev_rand_split.jsonl``) and the CoS-E v1.0 explanations (``cose_train_v1.0.jsonl``,
``cose_dev_v1.0.jsonl``), joined on ``id`` (3 options per question); or the hub's ``cos_e`` (config
``v1.11``, 5 options, already joined).

Splits: CommonsenseQA's test answers are not public, so ``test`` is the dev split (as the paper
evaluates) and ``train``/``validation`` come from the train split: ``validation`` is a deterministic
~10% carved by a hash of each question id, ``train`` the rest. The demonstration is the open-ended
explanation followed by the answer line.
"""

from __future__ import annotations

from pathlib import Path

from harness.data.prompts import LETTERS, mc_demonstration, mc_prompt, user_messages
from harness.data.records import Example
from harness.data.sources import hub_load, in_validation_carve, local_file, read_jsonl

NAME = "cos_e"
KIND = "multiple_choice"
SPLITS = ("train", "validation", "test")
HUB_ID = "cos_e"
HUB_CONFIG = "v1.11"
PROMPT_VERSION = 1
SIZES = {"train": 9741, "test": 1221}  # approximate split sizes (hub versions), for the plan's estimates


def _example(source_id: str, question: str, choices: tuple[str, ...], letter: str, rationale: str) -> Example:
    return Example(
        id=f"{NAME}/{source_id}",
        benchmark=NAME,
        kind=KIND,
        messages=user_messages(mc_prompt(question, choices)),
        demonstration=mc_demonstration(rationale, letter),
        answer=letter,
        choices=choices,
        metadata={"source_id": source_id, "prompt_version": PROMPT_VERSION},
    )


def _keep(source_id: str, split: str) -> bool:
    if split == "test":
        return True
    return in_validation_carve(source_id) == (split == "validation")


def load_local(folder: Path, split: str) -> list[Example]:
    part = "dev" if split == "test" else "train"
    questions = read_jsonl(
        local_file(folder, NAME, f"{part}_rand_split.jsonl", hub=f"{HUB_ID} ({HUB_CONFIG})")
    )
    explanations = read_jsonl(
        local_file(folder, NAME, f"cose_{part}_v1.0.jsonl", hub=f"{HUB_ID} ({HUB_CONFIG})")
    )
    rationale = {e["id"]: e["explanation"]["open-ended"] for e in explanations}
    examples = []
    for q in questions:
        if q["id"] not in rationale or not _keep(q["id"], split):
            continue  # inner join: a question without an explanation has no demonstration
        by_label = sorted(q["question"]["choices"], key=lambda c: c["label"])
        choices = tuple(c["text"] for c in by_label)
        letter = LETTERS[[c["label"] for c in by_label].index(q["answerKey"])]
        examples.append(_example(q["id"], q["question"]["stem"], choices, letter, rationale[q["id"]]))
    return examples


def load_hub(split: str) -> list[Example]:
    rows = hub_load(NAME, HUB_ID, HUB_CONFIG, "validation" if split == "test" else "train")
    examples = []
    for row in rows:
        if not _keep(row["id"], split):
            continue
        choices = tuple(row["choices"])
        letter = LETTERS[choices.index(row["answer"])]
        examples.append(_example(row["id"], row["question"], choices, letter, row["abstractive_explanation"]))
    return examples
