"""Benchmark loaders on the local copies in ``$UNISD_DATA_DIR`` (CI: ``../shared/data``).

Counts come from the files themselves (SOURCE.md and the split rules in each loader's docstring).
GPQA asks that its questions never be printed: its assertions compare ids and booleans only.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness.data import BENCHMARKS, DataNotFoundError, Example, load_benchmark
from harness.data import cos_e as cos_e_module
from harness.data import gpqa as gpqa_module
from harness.data import humaneval as humaneval_module
from harness.data import mbpp as mbpp_module
from harness.data import scienceqa as scienceqa_module
from harness.data.prompts import LETTERS
from harness.data.sources import ENV_VAR, stable_hash
from harness.errors import HarnessError

SIX = ("scienceqa", "cos_e", "mbpp", "toolalpaca", "gpqa", "humaneval")


def all_splits():
    return [(name, split) for name in SIX for split in BENCHMARKS[name].splits]


@pytest.fixture(scope="module")
def loaded(data_dir: Path) -> dict[tuple[str, str], list[Example]]:
    return {(name, split): load_benchmark(name, split, data_dir=data_dir) for name, split in all_splits()}


def test_registry_lists_the_six_benchmarks():
    assert set(SIX) <= set(BENCHMARKS)
    assert BENCHMARKS["gpqa"].splits == ("test",)
    assert BENCHMARKS["humaneval"].splits == ("test",)
    assert {BENCHMARKS[n].kind for n in SIX} == {"multiple_choice", "code", "tool_call"}


@pytest.mark.parametrize(
    ("name", "split", "expected"),
    [
        ("scienceqa", "train", 520),
        ("scienceqa", "validation", 180),
        ("scienceqa", "test", 194),
        ("cos_e", "test", 950),
        ("mbpp", "train", 120),
        ("mbpp", "validation", 43),
        ("mbpp", "test", 257),
        ("gpqa", "test", 198),
        ("humaneval", "test", 164),
    ],
)
def test_split_counts(loaded, name, split, expected):
    assert len(loaded[(name, split)]) == expected


def test_scienceqa_is_text_only_with_its_own_splits(loaded, data_dir):
    problems = json.loads((data_dir / "scienceqa" / "problems_partial.json").read_text())
    raw_split = {"train": "train", "validation": "val", "test": "test"}
    total = 0
    for split in ("train", "validation", "test"):
        for ex in loaded[("scienceqa", split)]:
            problem = problems[ex.metadata["source_id"]]
            assert problem["image"] is None
            assert problem["split"] == raw_split[split]
            assert ex.choices == tuple(problem["choices"])
            assert ex.answer == LETTERS[problem["answer"]]
            if problem["hint"]:
                assert problem["hint"].strip() in ex.prompt_text()
            if problem["solution"]:
                assert ex.demonstration.startswith(problem["solution"].strip()[:40])
        total += len(loaded[("scienceqa", split)])
    assert total == 894 == sum(1 for p in problems.values() if p["image"] is None)


def test_cos_e_joins_explanations_and_carves_validation_from_train(loaded, data_dir):
    train_ids = [json.loads(line)["id"] for line in open(data_dir / "cos_e" / "train_rand_split.jsonl")]
    dev_ids = [json.loads(line)["id"] for line in open(data_dir / "cos_e" / "dev_rand_split.jsonl")]
    train = {ex.metadata["source_id"] for ex in loaded[("cos_e", "train")]}
    validation = {ex.metadata["source_id"] for ex in loaded[("cos_e", "validation")]}
    test = {ex.metadata["source_id"] for ex in loaded[("cos_e", "test")]}
    assert not train & validation
    assert train | validation == set(train_ids) and len(train_ids) == 7610
    assert 0.07 < len(validation) / len(train_ids) < 0.13
    assert test == set(dev_ids)
    explanations = {}
    for line in open(data_dir / "cos_e" / "cose_dev_v1.0.jsonl"):
        row = json.loads(line)
        explanations[row["id"]] = row["explanation"]["open-ended"].strip()
    for ex in loaded[("cos_e", "test")]:
        assert ex.demonstration.startswith(explanations[ex.metadata["source_id"]])
        assert len(ex.choices) == 3


def test_mbpp_splits_follow_task_id_ranges(loaded):
    ranges = {"test": (11, 510), "validation": (511, 600), "train": (601, 974)}
    for split, (low, high) in ranges.items():
        ids = [int(ex.metadata["source_id"]) for ex in loaded[("mbpp", split)]]
        assert all(low <= i <= high for i in ids)
    for ex in loaded[("mbpp", "test")]:
        assert ex.demonstration == f"```python\n{ex.answer.strip(chr(10))}\n```"
        assert ex.tests.count("assert") >= 1
        first_assert = next(line for line in ex.tests.splitlines() if line.startswith("assert"))
        assert first_assert in ex.prompt_text()


def test_every_example_has_its_fields(loaded):
    seen_ids: set[str] = set()
    for (name, split), examples in loaded.items():
        assert examples, (name, split)
        for ex in examples:
            assert ex.id.startswith(f"{name}/") and ex.id not in seen_ids
            seen_ids.add(ex.id)
            assert ex.benchmark == name and ex.kind == BENCHMARKS[name].kind
            assert ex.messages and all(
                m["role"] in ("system", "user") and m["content"].strip() for m in ex.messages
            )
            assert ex.messages[-1]["role"] == "user"
            assert ex.prompt_text().strip()
            assert ex.demonstration.strip() and ex.answer.strip()
            assert ex.metadata["prompt_version"] == BENCHMARKS[name].prompt_version


def test_multiple_choice_letters_and_demonstrations(loaded):
    for name in ("scienceqa", "cos_e", "gpqa"):
        for split in BENCHMARKS[name].splits:
            bad = []
            for ex in loaded[(name, split)]:
                ok = (
                    2 <= len(ex.choices) <= len(LETTERS)
                    and ex.answer in LETTERS[: len(ex.choices)]
                    and ex.demonstration.splitlines()[-1] == f"The answer is ({ex.answer})."
                    and all(f"({LETTERS[i]}) " in ex.prompt_text() for i in range(len(ex.choices)))
                    and "The answer is (X)." in ex.prompt_text()
                )
                if not ok:
                    bad.append(ex.id)  # ids only: never print GPQA text
            assert not bad, (name, split, bad[:5])


def test_gpqa_options_are_shuffled_deterministically(loaded, data_dir):
    # Texts are compared through hashes so that no failure message can show a GPQA question or option.
    with open(data_dir / "gpqa" / "gpqa_diamond.csv", newline="", encoding="utf-8") as f:
        correct = {
            row["Record ID"].strip(): stable_hash(row["Correct Answer"].strip()) for row in csv.DictReader(f)
        }
    examples = loaded[("gpqa", "test")]
    wrong = [
        ex.id
        for ex in examples
        if stable_hash(ex.choices[LETTERS.index(ex.answer)]) != correct[ex.metadata["source_id"]]
    ]
    assert not wrong
    letters = [ex.answer for ex in examples]
    assert min(letters.count(letter) for letter in "ABCD") > 30  # spread over A-D, not all (A)
    again = load_benchmark("gpqa", "test", data_dir=data_dir)
    assert [ex.answer for ex in again] == letters
    assert all(x.choices == y.choices for x, y in zip(again, examples, strict=True))


def test_gpqa_and_humaneval_have_no_training_split(data_dir):
    with pytest.raises(HarnessError, match="evaluation-only") as info:
        load_benchmark("gpqa", "train", data_dir=data_dir)
    assert not isinstance(info.value, DataNotFoundError)
    with pytest.raises(HarnessError, match="evaluation-only"):
        load_benchmark("humaneval", "validation", data_dir=data_dir)


def test_humaneval_reference_plus_tests_is_a_program(loaded, data_dir):
    with gzip.open(data_dir / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        raw = {row["task_id"]: row for row in map(json.loads, f)}
    for ex in loaded[("humaneval", "test")]:
        row = raw[ex.metadata["source_id"]]
        assert ex.answer == row["prompt"] + row["canonical_solution"]
        assert ex.tests.endswith(f"\ncheck({row['entry_point']})\n")
        assert row["prompt"].strip() in ex.prompt_text()
        compile(ex.answer + "\n" + ex.tests, ex.id, "exec")
        assert ex.demonstration.startswith("```python\n") and ex.demonstration.endswith("\n```")


def _runs(program: str) -> bool:
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=30)
    return done.returncode == 0


@pytest.mark.parametrize("name", ["mbpp", "humaneval"])
def test_reference_solutions_pass_their_tests(data_dir, name):
    split = "test"
    for ex in load_benchmark(name, split, data_dir=data_dir, limit=6, seed=1):
        assert _runs(ex.answer + "\n" + ex.tests), ex.id
        assert not _runs(ex.answer + "\n" + ex.tests + "\nassert False\n")  # the check can fail


def test_toolalpaca_split_by_api(loaded, data_dir):
    apis = {
        split: {ex.metadata["api"] for ex in loaded[("toolalpaca", split)]}
        for split in ("train", "validation", "test")
    }
    simulated_test = {
        ex.metadata["api"] for ex in loaded[("toolalpaca", "test")] if ex.metadata["api_set"] == "simulated"
    }
    assert (len(apis["train"]), len(apis["validation"]), len(simulated_test)) == (6, 1, 3)
    assert not apis["train"] & apis["validation"] and not apis["train"] & apis["test"]
    assert not apis["validation"] & apis["test"]
    simulated = json.loads((data_dir / "toolalpaca" / "eval_simulated.json").read_text())
    real = json.loads((data_dir / "toolalpaca" / "eval_real.json").read_text())
    n_simulated = sum(len(api["Instructions"]) for api in simulated)
    n_real = sum(len(api["Instructions"]) for api in real)
    assert (n_simulated, n_real) == (100, 114)
    counts = {split: len(loaded[("toolalpaca", split)]) for split in ("train", "validation", "test")}
    assert sum(counts.values()) == n_simulated + n_real
    assert sum(ex.metadata["api_set"] == "real" for ex in loaded[("toolalpaca", "test")]) == n_real
    assert all(ex.metadata["api_set"] == "simulated" for ex in loaded[("toolalpaca", "train")])


def test_toolalpaca_answers_and_demonstrations(loaded):
    step = re.compile(r"Action: (?P<name>.+)\nAction Input: (?P<args>.+)")
    unparsed = 0
    for split in ("train", "validation", "test"):
        for ex in loaded[("toolalpaca", split)]:
            golden = json.loads(ex.answer)
            assert golden and all(set(s) == {"action", "arguments"} for s in golden)
            steps = list(step.finditer(ex.demonstration))
            assert len(steps) == len(golden) and len(ex.demonstration.splitlines()) == 2 * len(golden)
            for match, gold in zip(steps, golden, strict=True):
                assert match["name"] == gold["action"]
                if isinstance(gold["arguments"], dict):
                    assert json.loads(match["args"]) == gold["arguments"]
                else:
                    assert match["args"] == gold["arguments"]
            assert ex.metadata["golden_parsed"] == all(isinstance(s["arguments"], dict) for s in golden)
            unparsed += sum(not isinstance(s["arguments"], dict) for s in golden)
            assert "Action Input:" in ex.prompt_text() and len(ex.prompt_text()) < 2500
    assert unparsed == 36  # golden steps whose Action_Input is not JSON (placeholders, typos)


def test_subsampling_is_seeded_stable_and_ordered(data_dir):
    full = [ex.id for ex in load_benchmark("cos_e", "test", data_dir=data_dir)]
    a = [ex.id for ex in load_benchmark("cos_e", "test", data_dir=data_dir, limit=20, seed=7)]
    b = [ex.id for ex in load_benchmark("cos_e", "test", data_dir=data_dir, limit=20, seed=7)]
    c = [ex.id for ex in load_benchmark("cos_e", "test", data_dir=data_dir, limit=20, seed=8)]
    bigger = [ex.id for ex in load_benchmark("cos_e", "test", data_dir=data_dir, limit=40, seed=7)]
    assert a == b and len(a) == 20 and a != c
    assert a == [i for i in full if i in set(a)]  # original order
    assert set(a) <= set(bigger)
    assert a != full[:20]  # random, not the head of the file
    assert len(load_benchmark("humaneval", "test", data_dir=data_dir, limit=10_000)) == 164
    assert load_benchmark("mbpp", "test", data_dir=data_dir, limit=0) == []
    with pytest.raises(HarnessError, match="limit"):
        load_benchmark("mbpp", "test", data_dir=data_dir, limit=-1)


@pytest.mark.parametrize("name", SIX)
def test_missing_folder_names_both_ways(tmp_path, name):
    with pytest.raises(DataNotFoundError) as info:
        load_benchmark(name, "test", data_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / name) in message
    assert "data.data_dir" in message and ENV_VAR in message and "hub" in message


def test_missing_file_in_existing_folder_is_named(tmp_path):
    (tmp_path / "mbpp").mkdir()
    with pytest.raises(DataNotFoundError, match="sanitized-mbpp.json"):
        load_benchmark("mbpp", "test", data_dir=tmp_path)
    assert issubclass(DataNotFoundError, HarnessError)


def test_data_dir_argument_beats_env_var(monkeypatch, tmp_path, data_dir):
    monkeypatch.setenv(ENV_VAR, str(data_dir))
    assert len(load_benchmark("humaneval", "test")) == 164
    with pytest.raises(DataNotFoundError):
        load_benchmark("humaneval", "test", data_dir=tmp_path)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert len(load_benchmark("humaneval", "test", data_dir=data_dir)) == 164


def test_toolalpaca_without_local_data_explains_there_is_no_hub(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(DataNotFoundError, match=ENV_VAR) as info:
        load_benchmark("toolalpaca", "test")
    assert "data.data_dir" in str(info.value) and "no Hugging Face hub dataset" in str(info.value)


def test_hub_failure_becomes_one_line_data_error(monkeypatch):
    from harness.data.sources import hub_load

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataNotFoundError) as info:
        hub_load("mbpp", "unisd-harness-tests/no-such-dataset", None, "test")
    message = str(info.value)
    assert "\n" not in message and "hub" in message and "data.data_dir" in message and ENV_VAR in message


def test_unknown_names_list_the_valid_ones(data_dir):
    with pytest.raises(HarnessError, match="scienceqa"):
        load_benchmark("sciqa", "test", data_dir=data_dir)
    with pytest.raises(HarnessError, match="valid splits"):
        load_benchmark("mbpp", "dev", data_dir=data_dir)


def test_example_repr_leaves_out_the_text(loaded):
    ex = loaded[("scienceqa", "test")][0]
    assert ex.choices[0] not in repr(ex) and ex.prompt_text()[:30] not in repr(ex)
    assert ex.id in repr(ex)


def test_full_scienceqa_file_name_is_accepted(tmp_path, data_dir):
    problems = json.loads((data_dir / "scienceqa" / "problems_partial.json").read_text())
    few = dict(list(problems.items())[:40])
    (tmp_path / "scienceqa").mkdir()
    (tmp_path / "scienceqa" / "problems.json").write_text(json.dumps(few))
    examples = [
        ex
        for s in ("train", "validation", "test")
        for ex in load_benchmark("scienceqa", s, data_dir=tmp_path)
    ]
    assert len(examples) == sum(1 for p in few.values() if p["image"] is None) > 0


# The hub path cannot reach the network in tests; feed it real rows shaped as the hub serves them, so the
# row conversion is still exercised on real data.


def _dataset(rows: list[dict], features=None):
    import datasets

    return datasets.Dataset.from_list(rows, features=features)


def test_hub_rows_convert_like_local_files(monkeypatch, data_dir):
    import datasets

    problems = json.loads((data_dir / "scienceqa" / "problems_partial.json").read_text())
    rows = [
        {**{k: v for k, v in p.items() if k != "split"}, "image": None} for p in list(problems.values())[:30]
    ]
    names = [k for k in rows[0] if k != "image"]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            **{k: datasets.Value("int64") if k == "answer" else datasets.Value("string") for k in names},
        }
    )
    features["choices"] = datasets.Sequence(datasets.Value("string"))
    rows[1]["image"] = {"bytes": b"not decoded", "path": "image.png"}  # image questions are dropped
    monkeypatch.setattr(scienceqa_module, "hub_load", lambda *a: _dataset(rows, features))
    hub = scienceqa_module.load_hub("test")
    assert len(hub) == 29 and hub[0].answer == LETTERS[rows[0]["answer"]] and hub[0].id == "scienceqa/test-0"
    assert hub[1].id == "scienceqa/test-2"

    local = {ex.metadata["source_id"]: ex for ex in load_benchmark("cos_e", "test", data_dir=data_dir)}
    cos_rows = [
        {
            "id": sid,
            "question": ex.prompt_text().split("\n")[0].removeprefix("Question: "),
            "choices": list(ex.choices),
            "answer": ex.choices[LETTERS.index(ex.answer)],
            "abstractive_explanation": ex.demonstration.splitlines()[0],
            "extractive_explanation": "",
        }
        for sid, ex in list(local.items())[:25]
    ]
    monkeypatch.setattr(cos_e_module, "hub_load", lambda *a: _dataset(cos_rows))
    for ex in cos_e_module.load_hub("test"):
        assert ex.messages == local[ex.metadata["source_id"]].messages
        assert ex.answer == local[ex.metadata["source_id"]].answer

    mbpp_rows = json.loads((data_dir / "mbpp" / "sanitized-mbpp.json").read_text())[:10]
    monkeypatch.setattr(mbpp_module, "hub_load", lambda *a: _dataset(mbpp_rows))
    assert [ex.id for ex in mbpp_module.load_hub("test")] == [f"mbpp/{r['task_id']}" for r in mbpp_rows]

    with gzip.open(data_dir / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        he_rows = [json.loads(line) for line in f][:5]
    monkeypatch.setattr(humaneval_module, "hub_load", lambda *a: _dataset(he_rows))
    assert [ex.answer for ex in humaneval_module.load_hub("test")] == [
        r["prompt"] + r["canonical_solution"] for r in he_rows
    ]

    with open(data_dir / "gpqa" / "gpqa_diamond.csv", newline="", encoding="utf-8") as f:
        gpqa_rows = list(csv.DictReader(f))[:8]
    monkeypatch.setattr(gpqa_module, "hub_load", lambda *a: _dataset(gpqa_rows))
    local_gpqa = {ex.id: ex.answer for ex in load_benchmark("gpqa", "test", data_dir=data_dir)}
    assert all(local_gpqa[ex.id] == ex.answer for ex in gpqa_module.load_hub("test"))
