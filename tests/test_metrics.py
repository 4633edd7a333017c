"""Scoring rules: letter extraction on tricky outputs, code extraction, the canonical solutions of
HumanEval and MBPP through the sandbox, and tool-call accuracy on ToolAlpaca's real golden answers."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from harness.evaluation.metrics import (
    build_program,
    extract_choice_letter,
    extract_code,
    parse_arguments,
    parse_tool_calls,
    tool_call_correct,
)
from harness.evaluation.sandbox import run_programs

# --- multiple choice ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is (B).", "B"),
        ("Let me think. Water boils at 100 C.\nThe answer is (B).", "B"),
        ("B) because the mass is conserved", "B"),
        ("answer: b", "B"),
        ("Answer: B", "B"),
        ("Final answer: **C**", "C"),
        ("The correct option is D.", "D"),
        ("(A)", "A"),
        ("c", "C"),
        ("I think (A) or (C)", None),
        ("", None),
        ("No idea.", None),
        ("A) first\nB) second\nC) third", None),  # an echoed option list commits to nothing
        ("The answer is (C). Wait, no: the answer is (D).", "D"),  # the last explicit answer wins
        ("(A) looks tempting, but the answer is (C).", "C"),  # an explicit phrase beats marked letters
        ("The answer is (E).", None),  # beyond the 4 choices: ignored
        ("The answer is (E). So the answer is (B).", "B"),
        ("(E) is not an option, (B) is", "B"),
        ("the answer is a bit unclear", None),  # a lower-case article is not a letter
        ("A cat is a mammal, so it breathes air.", None),  # nor is a capital article in a sentence
        ("Answer: a.", "A"),
    ],
)
def test_extract_choice_letter(text, expected):
    assert extract_choice_letter(text, 4) == expected


def test_extract_choice_letter_respects_n_choices():
    assert extract_choice_letter("The answer is (C).", 3) == "C"
    assert extract_choice_letter("The answer is (C).", 2) is None
    assert extract_choice_letter("The answer is (C).", 0) is None


# --- code extraction and pass@k -------------------------------------------------------------------------


def test_extract_code_prefers_the_block_defining_the_entry_point():
    completion = (
        "Here is the solution:\n```python\ndef add(a, b):\n    return a + b\n```\n"
        "Example:\n```python\nprint(add(1, 2))\n```\n"
    )
    assert extract_code(completion, "add") == "def add(a, b):\n    return a + b\n"
    assert extract_code(completion) == "def add(a, b):\n    return a + b\n"  # the block with a def
    assert extract_code("```py\nx = 1\n```\n```python\ny = 2\n```") == "y = 2\n"  # else the last


def test_extract_code_other_fences_unclosed_and_raw():
    assert extract_code("```bash\npip install x\n```\n```\ndef f(): pass\n```") == "def f(): pass\n"
    assert extract_code("Sure!\n```python\ndef f():\n    return 1") == "def f():\n    return 1"
    assert extract_code("def f():\n    return 1\n") == "def f():\n    return 1\n"
    assert extract_code("") == ""


def test_build_program_appends_the_tests():
    program = build_program("```python\ndef f():\n    return 2\n```", "assert f() == 2")
    assert program == "def f():\n    return 2\n\n\nassert f() == 2\n"


# --- canonical solutions through the sandbox ------------------------------------------------------------


def humaneval_problems(data_dir: Path) -> list[dict]:
    with gzip.open(data_dir / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def humaneval_tests(problem: dict) -> str:
    return f"{problem['test']}\ncheck({problem['entry_point']})\n"


def mbpp_problems(data_dir: Path) -> list[dict]:
    return json.loads((data_dir / "mbpp" / "sanitized-mbpp.json").read_text(encoding="utf-8"))


def mbpp_tests(problem: dict) -> str:
    return "\n".join([*problem["test_imports"], *problem["test_list"]])


def score_code(completions, tests, timeout: float = 10.0, *, entry_points=None) -> list[bool]:
    """What the code tasks do with each completion: ``build_program``, then the sandbox."""
    entry_points = entry_points or [None] * len(completions)
    programs = [build_program(c, t, e) for c, t, e in zip(completions, tests, entry_points, strict=True)]
    return [result.passed for result in run_programs(programs, timeout=timeout)]


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\nIt handles the edge cases."


def test_humaneval_canonical_solutions_all_pass(data_dir):
    problems = humaneval_problems(data_dir)
    assert len(problems) == 164
    completions = [fenced(p["prompt"] + p["canonical_solution"]) for p in problems]
    passed = score_code(
        completions, [humaneval_tests(p) for p in problems], entry_points=[p["entry_point"] for p in problems]
    )
    failing = [p["task_id"] for p, ok in zip(problems, passed, strict=True) if not ok]
    assert failing == [] and sum(passed) / len(passed) == 1.0


def test_mbpp_canonical_solutions_all_pass(data_dir):
    problems = mbpp_problems(data_dir)
    assert len(problems) == 427
    passed = score_code([fenced(p["code"]) for p in problems], [mbpp_tests(p) for p in problems])
    failing = [p["task_id"] for p, ok in zip(problems, passed, strict=True) if not ok]
    assert failing == [] and sum(passed) / len(passed) == 1.0


def test_empty_and_wrong_completions_score_zero(data_dir):
    rng = random.Random(0)
    he = rng.sample(humaneval_problems(data_dir), 12)
    mb = rng.sample(mbpp_problems(data_dir), 12)
    tests = [humaneval_tests(p) for p in he] + [mbpp_tests(p) for p in mb]
    empty = [""] * len(tests)
    # Wrong: the right signature with a body that returns None, and a solution of another problem.
    stub = [fenced(p["prompt"] + "    return None\n") for p in he] + [
        fenced(mb[(i + 1) % len(mb)]["code"]) for i in range(len(mb))
    ]
    prose = ["I am not sure how to solve this problem."] * len(tests)
    for completions in (empty, stub, prose):
        assert sum(score_code(completions, tests, timeout=5.0)) == 0


# --- tool calls -------------------------------------------------------------------------------------------


def toolalpaca_cases(data_dir: Path) -> list[tuple[list[dict], list[dict]]]:
    """(raw golden steps, golden in our answer format) for every instruction of the simulated set."""
    cases = []
    for api in json.loads((data_dir / "toolalpaca" / "eval_simulated.json").read_text(encoding="utf-8")):
        for steps in api["Golden_Answers"]:
            golden = []
            for step in steps:
                try:
                    arguments = json.loads(step["Action_Input"])
                except json.JSONDecodeError:
                    arguments = step["Action_Input"]  # placeholders: kept raw, as harness.data does
                golden.append({"action": step["Action"], "arguments": arguments})
            cases.append((steps, golden))
    return cases


def as_completion(steps: list[dict], observations: bool = False) -> str:
    lines = []
    for step in steps:
        lines += [
            "Thought: I need to call the API.",
            f"Action: {step['Action']}",
            f"Action Input: {step['Action_Input']}",
        ]
        if observations:
            lines.append('Observation: {"status": 200}')
    return "\n".join(lines) + ("\nFinal Answer: done." if observations else "")


def test_golden_answers_formatted_as_predictions_are_correct(data_dir):
    cases = toolalpaca_cases(data_dir)
    assert len(cases) > 90
    for steps, golden in cases:
        for observations in (False, True):
            text = as_completion(steps, observations)
            assert tool_call_correct(text, golden), text
            assert tool_call_correct(text, json.dumps(golden)), text  # golden as Example.answer
            assert [c["action"] for c in parse_tool_calls(text)] == [s["Action"] for s in steps]


def test_changed_argument_is_wrong(data_dir):
    checked = 0
    for _, golden in toolalpaca_cases(data_dir):
        for i, step in enumerate(golden):
            args = step["arguments"]
            if not isinstance(args, dict):
                continue
            for key, value in args.items():
                if value in ("", None) or (isinstance(value, str) and value.startswith(("{", "${"))):
                    continue
                changed = [dict(s) for s in golden]
                changed[i] = {"action": step["action"], "arguments": {**args, key: "something else"}}
                assert not tool_call_correct(changed, golden)
                checked += 1
                break
    assert checked > 80


def test_wrong_order_missing_and_extra_calls_are_wrong(data_dir):
    cases = toolalpaca_cases(data_dir)
    multi = [golden for _, golden in cases if len({s["action"] for s in golden}) > 1]
    assert len(multi) > 10
    for golden in multi:
        assert not tool_call_correct(list(reversed(golden)), golden)
        assert not tool_call_correct(golden[:-1], golden)
    for _, golden in cases[:20]:
        assert not tool_call_correct([*golden, golden[-1]], golden)
        assert not tool_call_correct("", golden)
        renamed = [{**golden[0], "action": golden[0]["action"] + "X"}, *golden[1:]]
        assert not tool_call_correct(renamed, golden)


def test_argument_rules_empty_optional_placeholders_and_types():
    golden = [
        {"action": "searchAxolotlImages", "arguments": {"color": "wild", "gender": "", "size": "medium"}}
    ]
    assert tool_call_correct(
        'Action: searchAxolotlImages\nAction Input: {"size": "medium", "color": "wild"}', golden
    )
    assert tool_call_correct(
        "Action: searchAxolotlImages\nAction Input: {'color': 'wild', 'size': 'medium'}", golden
    )
    assert not tool_call_correct('Action: searchAxolotlImages\nAction Input: {"color": "wild"}', golden)
    # A placeholder for an earlier call's result matches any value; the key must still be there.
    chained = [
        {"action": "searchAnime", "arguments": {"query": "Attack on Titan"}},
        {"action": "getCastAndCrew", "arguments": '{"animeId": ${animeId from searchAnime}}'},
    ]
    text = (
        'Action: searchAnime\nAction Input: {"query": "Attack on Titan"}\nObservation: {"id": 16498}\n'
        'Action: getCastAndCrew\nAction Input: {"animeId": 16498}'
    )
    assert tool_call_correct(text, chained)
    assert not tool_call_correct(text.replace('"animeId"', '"id"'), chained)
    # JSON values: numbers compare by value, strings and numbers differ, booleans are not numbers.
    numeric = [{"action": "f", "arguments": {"limit": 3, "flag": True}}]
    assert tool_call_correct('Action: f\nAction Input: {"limit": 3.0, "flag": true}', numeric)
    assert not tool_call_correct('Action: f\nAction Input: {"limit": "3", "flag": true}', numeric)
    assert not tool_call_correct('Action: f\nAction Input: {"limit": 3, "flag": 1}', numeric)


def test_parse_tool_calls_tolerates_fences_and_trailing_text():
    text = (
        "I will look it up.\n```\nAction: getAxolotlFacts\n"
        'Action Input: {"category": "habitat", "limit": 3} and then I will answer\n```\n'
        "Action: `getRandomAxolotlImage`\nAction Input:\n"
    )
    assert parse_tool_calls(text) == [
        {"action": "getAxolotlFacts", "arguments": {"category": "habitat", "limit": 3}},
        {"action": "getRandomAxolotlImage", "arguments": {}},
    ]
    assert parse_tool_calls("No tools needed.") == []
    assert parse_arguments("not json at all ") == "not json at all"
    assert parse_arguments('```json\n{"a": 1}\n```') == {"a": 1}


def test_data_layer_demonstrations_score_as_correct(data_dir):
    # The training demonstrations (harness.data) and the metric must agree on the answer format.
    from harness.data import load_benchmark

    examples = load_benchmark("toolalpaca", "test", data_dir=data_dir)
    assert examples
    for example in examples:
        assert tool_call_correct(example.demonstration, example.answer), example.id
