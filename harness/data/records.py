"""The one record every benchmark loader returns, so training and evaluation never see dataset formats."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Example", "KINDS", "PRIMARY_METRIC"]

KINDS = ("multiple_choice", "code", "tool_call")
# The score of each kind: a benchmark's primary metric is ``<benchmark>.<PRIMARY_METRIC[kind]>``.
PRIMARY_METRIC = {"multiple_choice": "acc", "code": "pass_at_1", "tool_call": "acc"}


@dataclass(frozen=True)
class Example:
    """One benchmark item: the prompt, the gold completion for training, and the key for scoring.

    Attributes:
        id: Globally unique, ``"<benchmark>/<source id>"`` (e.g. ``"scienceqa/123"``).
        benchmark: The registry name (``"scienceqa"``).
        kind: ``"multiple_choice"``, ``"code"`` or ``"tool_call"``; decides how answers are extracted.
        messages: The prompt as chat messages (``{"role": "user", "content": ...}``).
        demonstration: The gold completion; it ends in the canonical answer format of its kind
            (MC: last line ``The answer is (B).``; code: one ```` ```python ```` block; tool_call:
            ``Action:`` / ``Action Input:`` lines).
        answer: MC: the letter; code: a reference program; tool_call: a JSON list of
            ``{"action": name, "arguments": {...}}`` (``arguments`` is the raw string when the dataset's
            golden input is not valid JSON; ``metadata["golden_parsed"]`` is then False).
        choices: MC option texts in letter order.
        tests: Code: a program appended after the candidate's code; the candidate passes iff it runs.
        metadata: Source fields useful for analysis, plus ``prompt_version`` (caches key on it).

    The text fields are left out of ``repr`` so that logging an example never prints a question (GPQA's
    authors ask that its questions stay out of logs).
    """

    id: str
    benchmark: str
    kind: str
    messages: tuple[dict, ...] = field(repr=False)
    demonstration: str = field(repr=False)
    answer: str = field(repr=False)
    choices: tuple[str, ...] = field(default=(), repr=False)
    tests: str = field(default="", repr=False)
    metadata: dict = field(default_factory=dict)

    def prompt_text(self) -> str:
        """The user content of the prompt, for models without a chat template."""
        return "\n\n".join(m["content"] for m in self.messages if m["role"] == "user")

    def to_training_example(self):
        """The trainer's own record (``unisd_components`` never imports the harness, so it has its own)."""
        from unisd_components.trainer import TrainingExample

        return TrainingExample(
            id=self.id,
            messages=[dict(m) for m in self.messages],
            demonstration=self.demonstration,
            kind=self.kind,
            choices=tuple(self.choices),
            answer=self.answer,
            benchmark=self.benchmark,
        )
