"""lm-eval's ``HFLM`` whose generation decodes the requests of every task together, prefilled in length groups.

Why: ``HFLM.generate_until`` makes one batch per set of generation kwargs, so tasks with different stop
sequences (ScienceQA's ``Question:``, MBPP's code fences) never share a batch, and each batch runs at its
longest prompt's width. On a CPU a decoding step costs about the same for 12 rows as for 36 (it reads
every weight either way), so the quickstart's three tasks of 12 questions paid three 48-step decoding
loops, and the prefill paid for padding. :class:`BucketedHFLM` keeps everything else of ``HFLM``
(tokenisation, chat template, truncation, log-likelihood requests, the response cache) and replaces
``generate_until``:

- requests are grouped by their generation kwargs except the stop sequences and the token budget
  (greedy with greedy), sorted by prompt length and cut into batches of ``batch_size`` rows;
- each batch runs :func:`unisd_components.prefill.generate_bucketed` (prompts prefilled in length
  groups), ``max_new_tokens`` = the batch's largest budget, each row stopping at its own request's stop
  sequences (and EOS) and cut at them and at its own budget afterwards, exactly as ``HFLM`` cuts.

The answers are those ``HFLM`` gives (same prompts, greedy, same cuts), up to float summation order.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from unisd_components.prefill import generate_bucketed

__all__ = ["BucketedHFLM", "RowStops"]


class RowStops(StoppingCriteria):
    """Per-row stop: row ``r`` is done once its generated text holds one of ``stops[r]``."""

    def __init__(self, tokenizer: Any, stops: list[list[str]], prompt_width: int) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.prompt_width = prompt_width
        self.done = [False] * len(stops)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        generated = input_ids[:, self.prompt_width :].tolist()
        for row, tokens in enumerate(generated):
            if not self.done[row]:
                text = self.tokenizer.decode(tokens)
                self.done[row] = any(stop and stop in text for stop in self.stops[row])
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


class BucketedHFLM(HFLM):
    """``HFLM`` with the cross-task, length-grouped ``generate_until`` of the module docstring."""

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        if not isinstance(self.batch_size, int) or self.backend != "causal" or self.think_end_token:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        plans = []  # (index, context, gen_kwargs, prompt ids, stops, budget, decoding kwargs)
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            stops = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            budget = int(kwargs.pop("max_gen_toks"))
            if kwargs.get("do_sample") is False and kwargs.get("temperature", 0.0) == 0.0:
                kwargs.pop("temperature", None)  # greedy: HFLM drops it too
            if "max_length" in kwargs:
                return super().generate_until(requests, disable_tqdm=disable_tqdm)
            ids = self._prompt_ids(context, self.max_length - budget)
            plans.append((index, context, gen_kwargs, ids, stops, budget, kwargs))
        groups: dict[str, list[tuple]] = {}
        for plan in plans:
            groups.setdefault(json.dumps(plan[6], sort_keys=True, default=str), []).append(plan)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running generate_until requests")
        for members in groups.values():
            members.sort(key=lambda plan: len(plan[3]))  # ascending: generate_bucketed keeps this order
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                for plan, text in zip(batch, self._generate(batch), strict=True):
                    results[plan[0]] = text
                    self.cache_hook.add_partial("generate_until", (plan[1], plan[2]), text)
                    bar.update(1)
        bar.close()
        return [r if r is not None else "" for r in results]

    def _prompt_ids(self, context: str, max_context: int) -> list[int]:
        """The context's tokens as ``HFLM.tok_batch_encode`` makes them (BOS rule, left truncation)."""
        ids, _ = self.tok_batch_encode([context], left_truncate_len=max_context, truncation=self.truncation)
        return ids[0].tolist()

    def _generate(self, batch: list[tuple]) -> list[str]:
        prompts = [plan[3] for plan in batch]
        budget = max(plan[5] for plan in batch)
        width = max(len(p) for p in prompts)
        stops = RowStops(self.tokenizer, [plan[4] for plan in batch], width)
        kwargs = copy.deepcopy(batch[0][6])
        with torch.no_grad():
            new_tokens = generate_bucketed(
                self.model,
                prompts,
                pad_id=self.tokenizer.pad_token_id,
                max_new_tokens=budget,
                stopping_criteria=StoppingCriteriaList([stops]),
                use_cache=True,
                **kwargs,
            )
        texts = []
        for plan, tokens in zip(batch, new_tokens.tolist(), strict=True):
            text = self.tok_decode(tokens[: plan[5]])
            texts.append(postprocess_generated_text(generation=text, stop=plan[4], think_end_token=None))
        return texts
