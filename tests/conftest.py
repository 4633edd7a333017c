"""Shared fixtures: tiny random models built from a config, the bundled tokenizer, the local data dir.

Nothing here downloads: the tokenizer comes from the bundled SmolLM2 GGUF (converted once into the user
cache dir), the data from ``$UNISD_DATA_DIR`` (CI: ``../shared/data``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Offline, always: a test that reaches for the hub must fail loudly, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not os.environ.get("UNISD_DATA_DIR"):
    os.environ["UNISD_DATA_DIR"] = str((REPO.parent / "shared" / "data").resolve())
# CI gives a path relative to the repo (../shared/data); tests that run `harness` in a subprocess from a
# temporary directory must see the same folder.
os.environ["UNISD_DATA_DIR"] = str(Path(os.environ["UNISD_DATA_DIR"]).resolve())


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["UNISD_DATA_DIR"]).resolve()
    assert path.is_dir(), f"benchmark data not found at {path}: set UNISD_DATA_DIR"
    return path


@pytest.fixture(scope="session")
def bundled_tokenizer():
    from harness.models import TINY_RANDOM_LLAMA, load_tokenizer

    return load_tokenizer(TINY_RANDOM_LLAMA)


@pytest.fixture()
def tiny_model_and_tokenizer(bundled_tokenizer):
    """A fresh tiny random Llama (hidden 64, 2 layers) per test: tests may train it."""
    from harness.models import TINY_RANDOM_LLAMA, load_model

    model, _ = load_model(TINY_RANDOM_LLAMA, device="cpu")
    return model, bundled_tokenizer


# Real services (tests/services.py): a throwaway PostgreSQL cluster, an MLflow server on it, and the shared
# smoke study run (one `harness run studies/smoke.yaml > log 2>&1` per session, read by the console tests
# and opened by the browser tests).
from services import mlflow_server, postgres, smoke_run  # noqa: E402, F401
