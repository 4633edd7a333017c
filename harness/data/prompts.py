"""The prompt and demonstration formats shared by the benchmark loaders.

Evaluation extracts answers in exactly these formats, and training demonstrations end with them:
multiple choice ``The answer is (B).`` on the last line; code one ```` ```python ```` block; tool use
``Action: <name>`` / ``Action Input: <json>`` lines (ToolAlpaca's own format). Prompts are kept to a few
hundred tokens because the default study runs on CPU.
"""

from __future__ import annotations

__all__ = [
    "LETTERS",
    "MC_INSTRUCTION",
    "answer_line",
    "code_block",
    "mc_demonstration",
    "mc_prompt",
    "tool_steps",
    "user_messages",
]

LETTERS = "ABCDEFGHIJ"
MC_INSTRUCTION = (
    "Explain your reasoning briefly, then finish with a last line of the form "
    '"The answer is (X)." where X is the letter of the correct option.'
)


def user_messages(content: str) -> tuple[dict, ...]:
    """A single-turn chat prompt. No system message: each model's chat template supplies its own."""
    return ({"role": "user", "content": content},)


def answer_line(letter: str) -> str:
    return f"The answer is ({letter})."


def mc_prompt(question: str, choices: list[str] | tuple[str, ...], context: str = "") -> str:
    """Context (if any), the question, options as ``(A) text`` lines, then the answer-format instruction."""
    parts = []
    if context.strip():
        parts.append(f"Context: {context.strip()}")
    parts.append(f"Question: {question.strip()}")
    options = "\n".join(f"({LETTERS[i]}) {choice.strip()}" for i, choice in enumerate(choices))
    parts.append(f"Options:\n{options}")
    parts.append(MC_INSTRUCTION)
    return "\n".join(parts)


def mc_demonstration(rationale: str, letter: str) -> str:
    """The rationale (when the dataset has one), then the canonical answer line."""
    rationale = rationale.strip()
    if not rationale:
        return answer_line(letter)
    if rationale[-1] not in ".!?":
        rationale += "."
    return f"{rationale}\n{answer_line(letter)}"


def code_block(code: str) -> str:
    """One fenced Python block, the canonical code answer."""
    return f"```python\n{code.strip(chr(10))}\n```"


def tool_steps(steps: list[tuple[str, str]]) -> str:
    """``Action:`` / ``Action Input:`` lines for each (function name, JSON arguments) step."""
    return "\n".join(f"Action: {name}\nAction Input: {arguments}" for name, arguments in steps)
