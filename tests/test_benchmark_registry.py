"""The benchmark records: what a benchmark must bring before it can be named, and what derives from them."""

from __future__ import annotations

import types

import pytest

from harness.data.registry import BENCHMARKS, TASKS_DIR, register_benchmark
from harness.spec import BENCHMARKS as SPEC_BENCHMARKS
from harness.spec import CODE_BENCHMARKS, EVAL_ONLY_BENCHMARKS


def _module(**overrides) -> types.ModuleType:
    module = types.ModuleType("fake_bench")
    fields = {
        "NAME": "fake_bench",
        "KIND": "multiple_choice",
        "SPLITS": ("train", "test"),
        "HUB_ID": None,
        "PROMPT_VERSION": 1,
        "SIZES": {"train": 10, "test": 5},
        "load_local": lambda folder, split: [],
        "load_hub": lambda split: [],
    }
    fields.update(overrides)
    for key, value in fields.items():
        if value is not None or key == "HUB_ID":
            setattr(module, key, value)
    return module


def test_the_spec_names_exactly_the_records():
    assert SPEC_BENCHMARKS == tuple(BENCHMARKS)
    assert "gsm8k" not in SPEC_BENCHMARKS  # no loader, no task: it cannot be named
    assert EVAL_ONLY_BENCHMARKS == {n for n, b in BENCHMARKS.items() if "train" not in b.splits}
    assert CODE_BENCHMARKS == {"mbpp", "humaneval"}
    for name, record in BENCHMARKS.items():
        assert (TASKS_DIR / name / f"{record.task('generative')}.yaml").is_file()
        assert (TASKS_DIR / name / f"{record.task('loglikelihood')}.yaml").is_file()
        assert set(record.sizes) >= {s for s in ("train", "test") if s in record.splits}


def test_a_benchmark_without_a_loader_a_task_or_sizes_is_refused(tmp_path):
    (tmp_path / "unisd_fake_bench.yaml").write_text("task: unisd_fake_bench\n")
    with pytest.raises(ValueError, match="has no loader load_hub"):
        register_benchmark(_module(load_hub=None), task_dir=tmp_path)
    with pytest.raises(ValueError, match="no lm-eval task"):
        register_benchmark(_module(), task_dir=tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="SIZES needs estimates for"):
        register_benchmark(_module(SIZES={"test": 5}), task_dir=tmp_path)
    with pytest.raises(ValueError, match="KIND must be one of"):
        register_benchmark(_module(KIND="essay"), task_dir=tmp_path)
    assert "fake_bench" not in BENCHMARKS


def test_a_registration_after_the_spec_was_built_is_refused(tmp_path):
    (tmp_path / "unisd_fake_bench.yaml").write_text("task: unisd_fake_bench\n")
    with pytest.raises(RuntimeError, match="register it before importing harness.spec"):
        register_benchmark(_module(), task_dir=tmp_path)
    assert "fake_bench" not in BENCHMARKS


def test_transfer_partners_live_in_the_records_and_are_the_spec_default():
    from harness.spec import DEFAULT_TRANSFER

    assert BENCHMARKS["scienceqa"].transfer == ("gpqa",) and BENCHMARKS["mbpp"].transfer == ("humaneval",)
    assert DEFAULT_TRANSFER == {n: b.transfer for n, b in BENCHMARKS.items() if b.transfer}
    assert DEFAULT_TRANSFER == {"scienceqa": ("gpqa",), "mbpp": ("humaneval",)}
    with pytest.raises(ValueError, match="TRANSFER needs a training split"):
        register_benchmark(_module(SPLITS=("test",), SIZES={"test": 5}, TRANSFER=("gpqa",)))
