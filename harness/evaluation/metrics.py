"""Scoring functions of the evaluation: answer-letter extraction, code extraction, tool calls.

Pure functions, so that the same completion always gets the same score and a test can check every rule
on a string. Code is run by the lm-eval tasks' sandbox filter (``harness/evaluation/tasks/_common.py``,
:mod:`harness.evaluation.sandbox`) on the program :func:`build_program` builds.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from typing import Any

__all__ = [
    "build_program",
    "extract_choice_letter",
    "extract_code",
    "parse_arguments",
    "parse_tool_calls",
    "tool_call_correct",
]

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# --- multiple choice ------------------------------------------------------------------------------------

# An explicit answer phrase, then the letter: "The answer is (B)", "answer: b", "Final answer: **C**",
# "the correct option is D". Group 1 (bracketed) or 2 (bare) is the letter.
_ANSWER_PHRASE = re.compile(
    r"(?:\banswer(?![a-z])(?:\s+is|\s*[:=])?"
    r"|\b(?:correct|right|best|final)\s+(?:option|choice)(?:\s+is|\s*:)?)"
    r"\s*(?:(?:option|choice|letter)\s*)?[:\-]?\s*"
    r"(?:[(\[]([A-Za-z])[)\]]|([A-Za-z])(?![A-Za-z0-9'])(\s*[.,;:!)]|[ \t]*(?:\n|$))?)",
    re.IGNORECASE,
)
# A marked option: "(B)" anywhere, or "B)", "B.", "B:" opening a line.
_MARKED = re.compile(r"\(([A-Za-z])\)|^[ \t]*([A-Za-z])\)|^[ \t]*([A-Z])[.:](?=\s|$)", re.MULTILINE)
_LONE_LETTER = re.compile(r"^[ \t]*([A-Za-z])[ \t]*[.!]?[ \t]*$", re.MULTILINE)


def extract_choice_letter(text: str, n_choices: int) -> str | None:
    """The answer letter a completion commits to (upper case), or None if it commits to none or to two.

    Precedence, first rule that yields a letter among the first ``n_choices`` (others are ignored):

    1. An explicit answer phrase ("The answer is (B).", "Answer: B", "answer: b", "Final answer: **C**",
       "the correct option is D"). The LAST one wins, so a self-correction counts: "The answer is (C).
       Wait, no: the answer is (D)." gives D. A lower-case bare letter counts only when nothing but
       punctuation or the end of the text follows it, so "the answer is a bit unclear" is no answer.
    2. Marked options: "(B)" anywhere, "B)" / "B." / "B:" at the start of a line, or a line that is a lone
       letter ("B", "b."). Exactly one distinct letter among them is the answer; two or more ("I think (A)
       or (C)", an echoed option list) are ambiguous: None.
    3. Otherwise None (no answer, e.g. empty text or a bare word "A" inside a sentence).
    """
    if not text or n_choices <= 0:
        return None
    valid = _LETTERS[:n_choices]
    text = text.replace("**", "").replace("__", "")
    answer = None
    for match in _ANSWER_PHRASE.finditer(text):
        bracketed, bare, tail = match.group(1), match.group(2), match.group(3)
        letter = bracketed or bare
        if bare and bare.islower() and tail is None:
            continue
        if letter.upper() in valid:
            answer = letter.upper()
    if answer:
        return answer
    marked = {
        (m.group(1) or m.group(2) or m.group(3)).upper()
        for pattern in (_MARKED, _LONE_LETTER)
        for m in pattern.finditer(text)
    }
    marked &= set(valid)
    return marked.pop() if len(marked) == 1 else None


# --- code ------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_OPEN_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n", re.IGNORECASE)
_PYTHON_TAGS = {"", "python", "python3", "py"}


def extract_code(completion: str, entry_point: str | None = None) -> str:
    """The Python program inside a completion.

    - Fenced blocks (```python, ```py or untagged; other languages only if there is nothing else): the
      last one defining ``entry_point`` when given, else the last one that defines a function or class
      (a model often follows its solution with a usage example block), else the last block.
    - No closed block: the text after an opening fence that was never closed (generation cut short).
    - No fence at all: the raw text, as a completion-style model writes plain code.
    """
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(completion)]
    python = [code for tag, code in blocks if tag in _PYTHON_TAGS] or [code for _, code in blocks]
    if python:
        if entry_point:
            defining = re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)
            chosen = [code for code in python if defining.search(code)]
            if chosen:
                return chosen[-1]
        with_defs = [code for code in python if re.search(r"^\s*(?:async\s+def|def|class)\s", code, re.M)]
        return (with_defs or python)[-1]
    opened = list(_OPEN_FENCE.finditer(completion))
    if opened:
        return completion[opened[-1].end() :]
    return completion


def build_program(completion: str, tests: str, entry_point: str | None = None) -> str:
    """The program that decides a code completion: its extracted code, then the benchmark's tests."""
    return f"{extract_code(completion, entry_point)}\n\n{tests}\n"


# --- tool calls ------------------------------------------------------------------------------------------

_ACTION = re.compile(r"^[ \t]*Action[ \t]*:[ \t]*(.*?)[ \t]*$", re.MULTILINE | re.IGNORECASE)
_ACTION_INPUT = re.compile(r"^[ \t]*Action[ \t]+Input[ \t]*:[ \t]*", re.MULTILINE | re.IGNORECASE)
# Where an Action Input ends: the next ReAct keyword line, or a closing code fence.
_INPUT_END = re.compile(
    r"^[ \t]*(?:Action|Action[ \t]+Input|Observation|Thought|Final[ \t]+Answer|ASSISTANT|USER)[ \t]*:"
    r"|^[ \t]*```",
    re.MULTILINE | re.IGNORECASE,
)
# ToolAlpaca's golden inputs refer to earlier results as ${animeId from searchAnime} (sometimes quoted,
# sometimes with a stray quote after): made into the JSON string "${...}" so the object parses.
_PLACEHOLDER_SYNTAX = re.compile(r'"?\$\{([^{}]*)\}"?')
_PLACEHOLDER_VALUE = re.compile(r"^\$?\{[^{}]*\}$")


def parse_arguments(raw: str) -> dict | str:
    """An ``Action Input`` as a dict, or its whitespace-normalised text when it is no object.

    Tried in order: JSON; the first JSON object in the text (trailing words tolerated); JSON after turning
    ``${...}`` placeholders into strings; a Python dict literal (single quotes). An empty input is ``{}``.
    """
    text = raw.strip()
    if text.startswith("```"):
        text = re.sub(r"^```[A-Za-z]*\s*|\s*```$", "", text).strip()
    if not text:
        return {}
    start = text.find("{")
    candidates = [text] if start < 0 else [text, text[start:]]
    for candidate in candidates:
        for variant in (
            candidate,
            _PLACEHOLDER_SYNTAX.sub(lambda m: json.dumps(f"${{{m.group(1)}}}"), candidate),
        ):
            try:
                value, _ = json.JSONDecoder().raw_decode(variant)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    try:
        value = ast.literal_eval(text[start:] if start >= 0 else text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = None
    if isinstance(value, dict):
        return value
    return " ".join(text.split())


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """The calls of a ToolAlpaca-style completion: ``[{"action": name, "arguments": dict | str}, ...]``.

    Each ``Action: <name>`` line is one call; its arguments are the ``Action Input:`` that follows (up to
    the next ``Action``/``Observation``/``Thought``/``Final Answer`` line or closing fence), parsed by
    :func:`parse_arguments`; a call without input has ``{}``. Code fences and text around are ignored;
    names are stripped of backticks and quotes.
    """
    calls = []
    actions = list(_ACTION.finditer(text))
    for i, match in enumerate(actions):
        name = match.group(1).strip("`'\" ")
        end = actions[i + 1].start() if i + 1 < len(actions) else len(text)
        segment = text[match.end() : end]
        given = _ACTION_INPUT.search(segment)
        arguments: dict | str = {}
        if given:
            rest = segment[given.end() :]
            stop = _INPUT_END.search(rest)
            arguments = parse_arguments(rest[: stop.start()] if stop else rest)
        calls.append({"action": name, "arguments": arguments})
    return calls


def tool_call_correct(predicted: str | Sequence[dict], golden: str | Sequence[dict]) -> bool:
    """ToolAlpaca tool-call accuracy of one example: does the prediction make exactly the golden calls?

    Definition (quoted by the README): correct iff both have the same number of calls, the same function
    names in the same order (exact, case-sensitive), and for each call the same arguments after parsing
    (:func:`parse_arguments`: key order, whitespace and quoting style do not matter; values compare as
    JSON values, so ``"3"`` differs from ``3``), where

    - an argument whose value is the empty string counts as absent (ToolAlpaca's golden answers list
      unused optional parameters as ``""``);
    - a golden value that is a placeholder for an earlier call's result (``${animeId from searchAnime}``,
      ``"{start date}"``) matches any value, since without executing the tools no model can know it;
    - arguments that are no JSON object on either side compare as whitespace-normalised text.

    Args:
        predicted: the completion text (parsed with :func:`parse_tool_calls`) or its parsed calls.
        golden: ``Example.answer`` (a JSON list of ``{"action", "arguments"}``) or that list.
    """
    if isinstance(predicted, str):
        predicted = parse_tool_calls(predicted)
    if isinstance(golden, str):
        golden = json.loads(golden)
    if len(predicted) != len(golden):
        return False
    return all(
        p["action"] == g["action"] and _arguments_match(p["arguments"], g["arguments"])
        for p, g in zip(predicted, golden, strict=True)
    )


def _arguments_match(predicted: dict | str, golden: dict | str) -> bool:
    predicted = parse_arguments(predicted) if isinstance(predicted, str) else predicted
    golden = parse_arguments(golden) if isinstance(golden, str) else golden
    if isinstance(predicted, str) or isinstance(golden, str):
        return isinstance(predicted, str) and isinstance(golden, str) and predicted == golden
    predicted = {k: v for k, v in predicted.items() if v != ""}
    golden = {k: v for k, v in golden.items() if v != ""}
    return predicted.keys() == golden.keys() and all(_value_match(predicted[k], golden[k]) for k in golden)


def _value_match(predicted: Any, golden: Any) -> bool:
    if isinstance(golden, str) and _PLACEHOLDER_VALUE.match(golden):
        return True
    if isinstance(golden, dict) and isinstance(predicted, dict):
        return predicted.keys() == golden.keys() and all(
            _value_match(predicted[k], golden[k]) for k in golden
        )
    if isinstance(golden, list) and isinstance(predicted, list):
        return len(predicted) == len(golden) and all(map(_value_match, predicted, golden))
    if isinstance(predicted, bool) or isinstance(golden, bool):
        return predicted is golden
    if isinstance(predicted, int | float) and isinstance(golden, int | float):
        return predicted == golden  # 3 and 3.0 are the same JSON number
    return type(predicted) is type(golden) and predicted == golden
