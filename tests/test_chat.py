"""One prompt renderer: the trainer's prompts are the evaluation's prompts, with or without a chat template."""

from __future__ import annotations

import copy

import pytest
import torch

from harness.evaluation.retention import _prompt_ids
from unisd_components.chat import encode_prompt, render_prompt
from unisd_components.config import TrainingConfig, VariantConfig
from unisd_components.step import PhaseTimer, StepRunner
from unisd_components.trainer import TrainingExample

MESSAGES = [{"role": "user", "content": "Question: 2 + 2?\nOptions:\n(A) 3\n(B) 4"}]


def _runner(model, tok) -> StepRunner:
    return StepRunner(
        model, tok, VariantConfig(), TrainingConfig(), [], None, None, PhaseTimer(torch.device("cpu")), 0
    )


@pytest.fixture()
def plain_tokenizer(bundled_tokenizer):
    """The bundled tokenizer without its chat template: a plain language model's."""
    tok = copy.deepcopy(bundled_tokenizer)
    tok.chat_template = None
    return tok


@pytest.mark.parametrize("templated", [True, False])
def test_training_and_evaluation_encode_the_same_prompt(
    templated, tiny_model_and_tokenizer, plain_tokenizer
):
    model, chat_tok = tiny_model_and_tokenizer
    tok = chat_tok if templated else plain_tokenizer
    example = TrainingExample(id="x/1", messages=MESSAGES, demonstration="The answer is (B).")
    training_ids = _runner(model, tok).prompt_ids(example)  # what the trainer feeds the student
    assert training_ids == _prompt_ids(tok, MESSAGES)  # what retention and PPL fit score
    assert training_ids == encode_prompt(tok, MESSAGES)


def test_plain_rendering_marks_where_the_completion_starts(plain_tokenizer, bundled_tokenizer):
    assert render_prompt(plain_tokenizer, MESSAGES) == MESSAGES[0]["content"] + "\n"
    templated = render_prompt(bundled_tokenizer, MESSAGES)
    assert templated.endswith("<|im_start|>assistant\n") and MESSAGES[0]["content"] in templated


def test_limit_keeps_the_end_of_the_prompt(bundled_tokenizer):
    ids = encode_prompt(bundled_tokenizer, MESSAGES)
    assert encode_prompt(bundled_tokenizer, MESSAGES, limit=5) == ids[-5:]
