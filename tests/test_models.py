from __future__ import annotations

import time

import pytest
import torch

from harness.errors import HarnessError
from harness.models import BUNDLED_SMOLLM2, load_model, resolve_device, resolve_dtype


def test_tiny_random_llama_is_seeded_and_generates(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    again, _ = load_model("tiny-random:llama", device="cpu")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert model.config.num_hidden_layers == 2 and model.dtype == torch.float32
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4


def test_dtype_and_device_resolution():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype(None, "cuda") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(HarnessError, match="unknown dtype"):
        resolve_dtype("fp8", "cpu")
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.parametrize("has_cuda", [False, True])
def test_device_resolution_with_and_without_cuda(monkeypatch, has_cuda):
    """Both branches run on every machine: CUDA's presence is what resolve_device asks torch."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_cuda)
    assert resolve_device(None).type == ("cuda" if has_cuda else "cpu")
    assert resolve_device("auto").type == ("cuda" if has_cuda else "cpu")
    if has_cuda:
        assert resolve_device("cuda:1") == torch.device("cuda:1")
    else:
        with pytest.raises(HarnessError, match="no CUDA"):
            resolve_device("cuda")


def test_unknown_builtin_and_missing_local_dir_are_clear(tmp_path):
    with pytest.raises(HarnessError, match="unknown model"):
        load_model("bundled:gpt-5")
    with pytest.raises(HarnessError, match="cannot load"):
        load_model(str(tmp_path / "nope"))


@pytest.mark.slow
def test_bundled_smollm2_answers_and_reloads_from_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("UNISD_CACHE_DIR", str(tmp_path))
    start = time.perf_counter()
    model, tokenizer = load_model(BUNDLED_SMOLLM2, device="cpu")
    first = time.perf_counter() - start
    assert (tmp_path / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    start = time.perf_counter()
    reloaded, _ = load_model(BUNDLED_SMOLLM2, device="cpu")
    second = time.perf_counter() - start
    print(f"first load (dequantize + cache) {first:.1f}s, reload from cache {second:.1f}s")
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_tiny_random_qwen2_is_a_second_architecture_with_the_bundled_tokenizer(bundled_tokenizer):
    model, tokenizer = load_model("tiny-random:qwen2", device="cpu")
    again, _ = load_model("tiny-random:qwen2", device="cpu")
    assert model.config.model_type == "qwen2" and type(model).__name__ == "Qwen2ForCausalLM"
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's attention biases
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert len(tokenizer) == len(bundled_tokenizer) == model.config.vocab_size
    ids = tokenizer("hi", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 3
