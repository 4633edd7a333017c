"""Issue 11 item 9: the library's CPU-sized defaults say so in `harness schema`, and the shipped GPU studies
state every training, LoRA and evaluation value they rely on (none falls back to a CPU-sized default)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harness.spec import EvaluationSpec, LoRASpec, ModelSpec, spec_json_schema
from unisd_components.config import TrainingConfig

REPO = Path(__file__).resolve().parents[1]
GPU_STUDIES = ["full_ablation.yaml", "unisd_full_search.yaml"]


def test_schema_marks_the_cpu_sized_defaults():
    defs = spec_json_schema()["$defs"]
    training = defs["TrainingSpec"]["properties"]
    for field, contract in (("grad_accum", "4"), ("max_completion_tokens", "2048")):
        text = training[field]["description"]
        assert "CPU-sized default" in text and contract in text, (field, text)
    lora = defs["LoRASpec"]["properties"]["r"]["description"]
    assert "CPU-sized default 16" in lora and "64" in lora


@pytest.mark.parametrize("name", GPU_STUDIES)
def test_gpu_studies_state_every_value_they_rely_on(name):
    data = yaml.safe_load((REPO / "studies" / name).read_text())
    sections = {
        "training": (data["training"], set(TrainingConfig.model_fields) - {"seed"}),
        "evaluation": (data["evaluation"], set(EvaluationSpec.model_fields)),
    }
    # device None: cuda when available. One model: its name is a label and its batch is training's; in a
    # list each model states both.
    models = data["model"] if isinstance(data["model"], list) else [data["model"]]
    optional = {"device"} if isinstance(data["model"], list) else {"device", "name", "batch_size"}
    for i, model in enumerate(models):
        sections[f"model[{i}]"] = (model, set(ModelSpec.model_fields) - optional)
        sections[f"model[{i}].lora"] = (model["lora"], set(LoRASpec.model_fields))
    for where, (written, fields) in sections.items():
        missing = sorted(fields - set(written))
        assert not missing, f"{name}: {where} leaves {missing} to the library's defaults"
