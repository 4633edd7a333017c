"""The one prompt renderer: chat messages as the text and token ids a model is given.

Why one: training (the student's prompts, the teachers' contexts) and evaluation (retention, PPL fit)
must score the same prompts, or retention measures drift on prompts the model was never trained on. The
harness imports this module for its evaluation; lm-eval renders our tasks the same way for chat models
(``apply_chat_template`` with a single user turn, see ``harness/evaluation/tasks/_common.py``).

- With a chat template: the template, with the generation prompt (the assistant turn opened); the
  template carries its own special tokens, so none are added when tokenizing.
- Without one (a plain LM): every message's content, separated by blank lines, then a line break where
  the completion starts; no special tokens added (as lm-eval's HF model does by default).

Example::

    ids = encode_prompt(tokenizer, [{"role": "user", "content": "2 + 2?"}], limit=1024)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["encode_prompt", "render_prompt"]


def render_prompt(tokenizer: Any, messages: Sequence[dict]) -> str:
    """The prompt text: chat template + generation prompt, or the plain-LM rendering (module docstring)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return "\n\n".join(str(m["content"]) for m in messages) + "\n"


def encode_prompt(tokenizer: Any, messages: Sequence[dict], limit: int | None = None) -> list[int]:
    """Token ids of :func:`render_prompt`; with ``limit``, the last ``limit`` tokens (the prompt's end,
    next to the completion, is what matters)."""
    ids = list(tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"])
    return ids[-limit:] if limit is not None else ids
