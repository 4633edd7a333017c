"""A sixth mechanism and a seventh benchmark are one module each, and nothing else changes.

The toy mechanism (``toy_entropy``: an entropy bonus) and the toy benchmark (``toy_arith``: synthetic
additions as multiple choice, with its own lm-eval task folder) are defined in this file as module
sources and written to a temporary folder, named in ``$UNISD_PLUGINS`` (each registers itself when
imported), then the ordinary ``harness`` commands run: ``validate`` (the spec accepts both names, the plan counts and
sizes them), ``run`` (the variant with the toy mechanism trains, every trial is evaluated on the toy
benchmark) and the report (the toy mechanism is a factor, the toy benchmark a metric). No file of the
repository is touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]

TOY_MECHANISM = '''
"""Mechanism 6 (toy): an entropy bonus on the student's completion distribution."""
from pydantic import Field

from unisd_components.component import Component
from unisd_components.registry import MechanismConfig, register_mechanism


class ToyEntropyConfig(MechanismConfig):
    """Toy mechanism: subtract weight x mean token entropy of the student from the loss."""

    weight: float = Field(0.05, ge=0)


class ToyEntropyComponent(Component):
    name = "toy_entropy"
    needs_full_distribution = True  # the entropy needs every token's probability, not the sampled one

    def loss_terms(self, scores, metrics):
        from unisd_components.losses import weighted_sequence_mean

        entropy = -(scores.student_logps.exp() * scores.student_logps).sum(-1)
        value = weighted_sequence_mean(entropy, scores.mask)
        metrics["toy_entropy_called"] = 1.0
        return {"toy_entropy": -self.config.weight * value}


register_mechanism(ToyEntropyConfig, ToyEntropyComponent)
'''

TOY_BENCHMARK = '''
"""Benchmark 7 (toy): which of four numbers is a + b, as multiple choice; generated, no files."""
import random
import sys
from pathlib import Path

from harness.data import register_benchmark
from harness.data.prompts import LETTERS, mc_demonstration, mc_prompt, user_messages
from harness.data.records import Example

NAME = "toy_arith"
KIND = "multiple_choice"
SPLITS = ("train", "test")
HUB_ID = None
PROMPT_VERSION = 1
SIZES = {"train": 12, "test": 6}


def _examples(split):
    rng = random.Random(split)
    out = []
    for i in range(SIZES[split]):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        options = [a + b, a + b + 1, a + b - 1, a + b + 2]
        rng.shuffle(options)
        letter = LETTERS[options.index(a + b)]
        choices = tuple(str(o) for o in options)
        out.append(Example(
            id=f"{NAME}/{split}-{i}", benchmark=NAME, kind=KIND,
            messages=user_messages(mc_prompt(f"What is {a} + {b}?", choices)),
            demonstration=mc_demonstration(f"{a} + {b} = {a + b}", letter), answer=letter, choices=choices,
            metadata={"prompt_version": PROMPT_VERSION},
        ))
    return out


def load_local(folder, split):
    return _examples(split)


def load_hub(split):
    return _examples(split)


register_benchmark(sys.modules[__name__], task_dir=Path(__file__).parent / "tasks" / "toy_arith")
'''

TOY_TASK = """
task: unisd_toy_arith
custom_dataset: !function utils.load_docs
test_split: test
output_type: generate_until
doc_to_text: prompt
doc_to_target: answer
process_results: !function utils.process_results
generation_kwargs: {until: ["Question:"], do_sample: false, temperature: 0.0, max_gen_toks: 16}
metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]
metadata: {version: 1.0}
"""

TOY_TASK_UTILS = '''
from harness.evaluation.tasks._common import load_docs as _load_docs
from harness.evaluation.tasks._common import process_multiple_choice as process_results


def load_docs(**metadata):
    return _load_docs("toy_arith", **metadata)
'''

STUDY = """
name: toy
model: {ref: tiny-random:llama, dtype: float32, device: cpu}
data: {train: [toy_arith], train_size: 8}
method:
  subsets: [[], [toy_entropy]]
  toy_entropy: {weight: 0.05}
training: {max_steps: 1, batch_size: 4, max_prompt_tokens: 128, max_completion_tokens: 8}
evaluation: {benchmarks: [toy_arith, scienceqa], limit: 2, batch_size: 2, max_gen_tokens: 8}
output_dir: runs/toy
"""

@pytest.fixture(scope="module")
def toy_study(tmp_path_factory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("toy")
    (folder / "toy_mechanism.py").write_text(textwrap.dedent(TOY_MECHANISM))
    (folder / "toy_benchmark.py").write_text(textwrap.dedent(TOY_BENCHMARK))
    tasks = folder / "tasks" / "toy_arith"
    tasks.mkdir(parents=True)
    (tasks / "unisd_toy_arith.yaml").write_text(TOY_TASK)
    (tasks / "utils.py").write_text(textwrap.dedent(TOY_TASK_UTILS))
    (folder / "toy.yaml").write_text(STUDY)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(folder), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "UNISD_PLUGINS": "toy_mechanism,toy_benchmark",  # imported with the built-ins, in every process
    }
    output = ""
    for command in (["validate", "toy.yaml"], ["run", "toy.yaml", "--dry-run"], ["run", "toy.yaml"]):
        proc = subprocess.run(
            [sys.executable, "-m", "harness", *command],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        output += proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-4000:]
    return folder, output


def _trial_dir(folder: Path, variant_name: str) -> Path:
    for config in (folder / "runs" / "toy" / "trials").glob("*/variant.json"):
        if json.loads(config.read_text())["variant_name"] == variant_name:
            return config.parent
    raise AssertionError(f"no trial of {variant_name}")


def test_a_sixth_mechanism_is_one_module(toy_study):
    folder, output = toy_study
    # accepted by the spec and planned
    assert "toy.yaml: valid" in output and "variants   2: sdft, unisd[toy_entropy]" in output
    # trained: its loss term and its metric reach the history
    trial = _trial_dir(folder, "unisd[toy_entropy]")
    variant = json.loads((trial / "variant.json").read_text())["variant"]
    assert variant["toy_entropy"] == {"weight": 0.05}
    row = json.loads((trial / "history.json").read_text())[0]
    assert row["toy_entropy_called"] == 1.0 and row["loss_toy_entropy"] < 0
    assert row["loss"] == pytest.approx(row["loss_divergence"] + row["loss_toy_entropy"], rel=1e-5)
    # reported: a 0/1 factor of the results table and of the report
    results = pd.read_csv(folder / "runs" / "toy" / "report" / "results.csv")
    assert sorted(results["toy_entropy"].tolist()) == [0, 1]
    assert "toy_entropy" in (folder / "runs" / "toy" / "report" / "report.md").read_text()


def test_a_seventh_benchmark_is_one_module(toy_study):
    folder, output = toy_study
    # accepted by the spec and planned with its own size estimates (8 train, 2 + 2 evaluated)
    assert "train      toy_arith (8 examples per variant)" in output
    assert "evaluate   toy_arith, scienceqa (4 examples per trial)" in output
    # evaluated: its primary metric in every trial, by its own lm-eval task
    trial = _trial_dir(folder, "sdft")
    metrics = json.loads((trial / "eval" / "metrics.json").read_text())["metrics"]
    assert 0.0 <= metrics["toy_arith.acc"] <= 1.0 and metrics["toy_arith.n"] == 2
    samples = [json.loads(line) for line in (trial / "eval" / "samples.jsonl").read_text().splitlines()]
    assert {s["task"] for s in samples} == {"unisd_toy_arith", "unisd_scienceqa"}
    assert any("What is" in s["prompt"] for s in samples if s["benchmark"] == "toy_arith")
    # reported: a metric column of the results table
    results = pd.read_csv(folder / "runs" / "toy" / "report" / "results.csv")
    assert "toy_arith.acc" in results.columns and results["toy_arith.acc"].notna().all()


def test_a_registration_after_the_spec_is_built_is_refused():
    """The derived structures are built once: a late registration would be silently missing, so it fails."""
    code = (
        "import harness.spec\n"
        "from pydantic import BaseModel\n"
        "from unisd_components.component import Component\n"
        "from unisd_components.registry import register_mechanism\n"
        "class Late(Component):\n    name = 'late'\n"
        "class LateConfig(BaseModel):\n    pass\n"
        "try:\n    register_mechanism(LateConfig, Late)\n"
        "except RuntimeError as err:\n    print('refused:', err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "refused: mechanism 'late' registered after unisd_components.config" in out.stdout, out.stderr
