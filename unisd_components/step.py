"""One micro-step of self-distillation: sample, score under the teachers, build the loss, backward.

Read top to bottom, a distillation micro-step is:

1. **generation**: sample one completion per prompt from the student (``generate`` with the KV cache,
   prompts prefilled in groups of similar length then decoded as one batch, a LoRA adapter folded into
   the weights, eval mode, no gradient, pure temperature sampling: no top-k/top-p, so the
   samples are on-policy for the distribution the loss is computed at); or, when the trainer is given a
   generation engine (:mod:`unisd_components.vllm_engine`), the same rule in vLLM, from the current
   weights pushed into it once per optimizer step: the engine only proposes tokens, every log-prob of
   the loss is computed below by the training model;
2. **teacher**: with the teacher weights, one gradient-free pass over every teacher row: the main
   demonstration context (full-vocabulary log-probs, and final hidden states for feature matching),
   then every component's extra contexts (K agreement contexts, the negative context) of which only
   the sampled-token log-probs are kept, and the KL-to-base reference rows when the base weights are
   the teacher's. Each row stops at its completion's EOS, and rows are sorted by length and cut into
   chunks of a token budget, so little compute goes to padding. An EMA teacher runs with its adapter
   folded into the weights; a frozen teacher keeps its contexts' KV for the process's later trials
   (:func:`unisd_components.prefill.keep_context_prefix`), which then run only the completions;
3. **student**: ``[prompt | completion]`` with gradient, LM head on completion positions only, the
   divergence, the components' weights and terms, each term checked for finiteness, then backward of
   ``loss / grad_accum``.

Every row is ``[left padding | context | completion]`` (see :mod:`unisd_components.scoring`).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from unisd_components import contexts
from unisd_components.cache import tensors_fingerprint
from unisd_components.chat import encode_prompt
from unisd_components.config import TrainingConfig, VariantConfig
from unisd_components.divergence import token_divergence
from unisd_components.fused_loss import FusedScores, HeadWeights, fused_head_scores, head_weights
from unisd_components.generation import sampling_kwargs, stated_decoding
from unisd_components.lora import adapters_folded
from unisd_components.losses import masked_sequence_means, sequence_weighted_mean, weighted_sequence_mean
from unisd_components.prefill import (
    cache_from_rows,
    cache_kwarg,
    context_prefix,
    forward_overhead_tokens,
    generate_bucketed,
    keep_context_prefix,
    length_buckets,
    plain_cache_layers,
)
from unisd_components.registry import Component, StepScores
from unisd_components.scoring import (
    completion_hidden,
    completion_logps,
    decoder_and_head,
    pad_left,
    sampled_token_logps,
)
from unisd_components.teachers import TeacherWeights

__all__ = [
    "NonFiniteLossError",
    "PhaseTimer",
    "StepRunner",
    "completion_mask",
    "eos_token_ids",
    "sample_completions",
]

# Tokens (rows x padded length) per forward chunk; rows are length-sorted before chunking. On a CPU every
# padded token is computed for nothing and a chunk of ~2k tokens already saturates the cores; on a GPU
# fewer, larger batches win.
_TOKEN_BUDGET = {"cpu": 2048, "cuda": 32768}
_DEFAULT_TOKEN_BUDGET = 8192
_PHASES = ("generation", "teacher", "student", "backward", "optimizer")


class NonFiniteLossError(RuntimeError):
    """A loss term (or the updated weights) went NaN/inf: the variant stops here, naming step and term."""

    def __init__(self, step: int, term: str, value: float | None = None) -> None:
        self.step = step
        self.term = term
        self.value = value
        shown = "" if value is None else f" (value {value})"
        super().__init__(f"non-finite loss at optimizer step {step}: term {term!r}{shown}")


class PhaseTimer:
    """Wall-clock seconds per phase (``time.perf_counter``), synchronising CUDA so GPU time lands right."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = dict.fromkeys(_PHASES, 0.0)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def eos_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every id that ends a completion: the generation config's EOS ids and the tokenizer's EOS."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError("the tokenizer and model define no EOS token; completions could never end")
    return sorted(ids)


def completion_mask(tokens: torch.Tensor, eos_ids: Sequence[int], skip_first: int = 0) -> torch.Tensor:
    """Bool ``[B,T]``: completion tokens up to and including the first EOS; the first ``skip_first`` off."""
    is_eos = torch.isin(tokens, torch.tensor(list(eos_ids), device=tokens.device))
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()
    mask = eos_before == 0
    if skip_first:
        mask[:, :skip_first] = False
    return mask


def sample_completions(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    pad_id: int,
    eos_ids: Sequence[int],
) -> torch.Tensor:
    """One sampled completion per prompt (token lists): ``[B,T]``, padded after EOS with ``pad_id``.

    The prompts are prefilled in groups of similar length (:func:`unisd_components.prefill.generate_bucketed`)
    and a LoRA student samples with its adapter folded into its weights
    (:func:`unisd_components.lora.adapters_folded`): the same distribution, fewer operations.
    """
    was_training = model.training
    model.eval()
    try:
        # Samples from p_theta at the temperature and nothing else (unisd-method.md section 5): whatever
        # the checkpoint's generation_config ships (repetition penalty, n-gram blocking ...) stays out.
        with torch.no_grad(), stated_decoding(model), adapters_folded(model):
            return generate_bucketed(
                model,
                prompts,
                pad_id=pad_id,
                **sampling_kwargs(temperature),
                max_new_tokens=max_new_tokens,
                eos_token_id=list(eos_ids),
                use_cache=True,
            )
    finally:
        model.train(was_training)


@dataclass
class _Rows:
    """Rows to score: each row's context tokens and the batch example whose completion it carries."""

    contexts: list[list[int]]
    batch_index: list[int]


class StepRunner:
    """Holds what every micro-step reuses (tokenized contexts, teacher weights, components) and runs it."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        variant: VariantConfig,
        training: TrainingConfig,
        components: Sequence[Component],
        teacher: TeacherWeights | None,
        base: TeacherWeights | None,
        timer: PhaseTimer,
        seed: int,
        engine: Any | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.variant = variant
        self.training = training
        self.components = list(components)
        self.teacher = teacher
        self.base = base
        self.timer = timer
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.tau = training.loss_temperature or training.temperature
        self.needs_hidden = any(c.needs_hidden for c in self.components)
        self.drops_divergence = any(c.drops_divergence for c in self.components)
        # Fused: LM head + divergence chunk by chunk (unisd_components.fused_loss), no [B,T,V] tensor.
        # A mechanism that reads the full [B,T,V] distributions (none of the five) keeps the unfused path.
        self.fused = training.fused_loss and not any(c.needs_full_distribution for c in self.components)
        self._policy_rng = random.Random(f"{seed}:gkd-policy")
        self._token_cache: dict[tuple[str, str], list[int]] = {}
        # A generation engine (``unisd_components.vllm_engine.VLLMEngine``) samples instead of
        # ``generate``; it holds the weights of optimizer step ``_engine_step`` (None: not pushed yet).
        self.engine = engine
        self._engine_step: int | None = None
        # A frozen teacher (no EMA) keeps its contexts' KV across the process's trials (prefill module).
        frozen = teacher is not None and not any(c.needs_ema_teacher for c in self.components)
        self._frozen_fingerprint = _teacher_fingerprint(teacher, self.device) if frozen else None

    # ---- tokenization (cached: contexts never change during a run)

    def encode(self, key: tuple[str, str], messages: Sequence[dict], limit: int) -> list[int]:
        ids = self._token_cache.get(key)
        if ids is None:
            ids = encode_prompt(self.tokenizer, messages, limit)
            self._token_cache[key] = ids
        return ids

    def prompt_ids(self, example: Any) -> list[int]:
        return self.encode((example.id, "prompt"), example.messages, self.training.max_prompt_tokens)

    def teacher_context_ids(self, example: Any) -> list[int]:
        messages = contexts.demonstration_context(example.messages, example.demonstration)
        return self.encode((example.id, "teacher"), messages, 2 * self.training.max_prompt_tokens)

    def gold_completion(self, examples: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Gold demonstrations as completions: tokens ``[B,T]`` (demonstration, then EOS if it fits in
        ``max_completion_tokens``; pad after), the bool mask of real tokens (by length, since the pad id
        may equal EOS) and the lengths."""
        limit = self.training.max_completion_tokens
        # The end-of-turn token the chat template uses (Qwen: <|im_end|>, not <|endoftext|>).
        eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.eos_ids[0]
        rows = []
        for ex in examples:
            ids = list(self.tokenizer(ex.demonstration, add_special_tokens=False)["input_ids"])
            rows.append(ids[:limit] if len(ids) >= limit else ids + [eos])
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        mask[:, : self.training.skip_first_tokens] = False
        return tokens.to(self.device), mask.to(self.device), [len(r) for r in rows]

    # ---- forward passes

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()  # never bf16 on CPU

    def _row_hidden(
        self, module: nn.Module, rows: _Rows, completion: torch.Tensor, lengths: list[int]
    ) -> torch.Tensor:
        """Completion hidden states ``[R,T,H]`` of ``[context_r | completion[b_r][:lengths[b_r]]]``.

        Each row carries its completion only up to its EOS (the padding after it is never computed);
        rows are sorted by length and cut into chunks of about ``_TOKEN_BUDGET`` tokens, so padding
        between rows stays small too.
        """
        T = completion.shape[1]
        tokens = completion.tolist()
        full = [rows.contexts[r] + tokens[b][: lengths[b]] for r, b in enumerate(rows.batch_index)]
        budget = _TOKEN_BUDGET.get(self.device.type, _DEFAULT_TOKEN_BUDGET)
        if len(full) * max(len(f) for f in full) <= budget:
            chunks = [list(range(len(full)))]  # one forward, rows in their own order
        else:
            chunks = [[]]
            for r in sorted(range(len(full)), key=lambda r: len(full[r])):
                if chunks[-1] and (len(chunks[-1]) + 1) * len(full[r]) > budget:
                    chunks.append([])
                chunks[-1].append(r)
        pieces: dict[int, torch.Tensor] = {}
        for chunk in chunks:
            ids, mask = pad_left([full[r] for r in chunk], self.pad_id)
            row_lengths = torch.tensor([lengths[rows.batch_index[r]] for r in chunk])
            hidden = completion_hidden(module, ids.to(self.device), mask.to(self.device), T, row_lengths)
            if len(chunks) == 1:
                return hidden
            for i, r in enumerate(chunk):
                pieces[r] = hidden[i]
        return torch.stack([pieces[r] for r in range(len(full))])

    def _row_hidden_after_kept_contexts(
        self, module: nn.Module, rows: _Rows, completion: torch.Tensor, lengths: list[int], fingerprint: str
    ) -> torch.Tensor:
        """:meth:`_row_hidden` for frozen weights: each context's KV (all its tokens but the last) is kept
        across trials (:func:`unisd_components.prefill.keep_context_prefix`), so a context already scored
        under these weights costs only its completion. Same hidden states, up to float summation order."""
        contexts_ = rows.contexts
        if any(len(c) < 2 for c in contexts_):
            return self._row_hidden(module, rows, completion, lengths)
        decoder, _ = decoder_and_head(module)
        budget = _TOKEN_BUDGET.get(self.device.type, _DEFAULT_TOKEN_BUDGET)
        local: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        missing = []
        for r, context in enumerate(contexts_):
            kept = context_prefix(fingerprint, context[:-1])
            if kept is None:
                missing.append(r)
            else:
                local[r] = kept
        overhead = forward_overhead_tokens(self.device)
        for group in length_buckets([len(contexts_[r]) - 1 for r in missing], overhead, max_rows=None):
            group_rows = [missing[i] for i in group]
            width = max(len(contexts_[r]) - 1 for r in group_rows)
            for start in range(0, len(group_rows), max(1, budget // width)):
                chunk = group_rows[start : start + max(1, budget // width)]
                ids, mask = pad_left([contexts_[r][:-1] for r in chunk], self.pad_id)
                out = decoder(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(self.device),
                    use_cache=True,
                )
                layers = plain_cache_layers(out.past_key_values)
                if layers is None:  # not a plain cache: score the whole rows as usual
                    return self._row_hidden(module, rows, completion, lengths)
                for i, r in enumerate(chunk):
                    n = len(contexts_[r]) - 1
                    local[r] = [(k[i, :, -n:], v[i, :, -n:]) for k, v in layers]
                    keep_context_prefix(fingerprint, contexts_[r][:-1], local[r])
        T = completion.shape[1]
        tokens = completion.tolist()
        out_hidden = None
        order = sorted(range(len(contexts_)), key=lambda r: len(contexts_[r]))
        width_cap = max(1, budget // (max(len(c) for c in contexts_) + T))
        for start in range(0, len(order), width_cap):
            chunk = order[start : start + width_cap]
            width = max(len(contexts_[r]) - 1 for r in chunk)
            cache = cache_from_rows([local[r] for r in chunk], width)
            past_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            feed = torch.full((len(chunk), T), self.pad_id, dtype=torch.long)
            feed_mask = torch.zeros((len(chunk), T), dtype=torch.long)
            for i, r in enumerate(chunk):
                n = len(contexts_[r]) - 1
                past_mask[i, width - n :] = 1
                b = rows.batch_index[r]
                row = [contexts_[r][-1]] + tokens[b][: max(lengths[b], 1) - 1]
                feed[i, : len(row)] = torch.tensor(row, dtype=torch.long)
                feed_mask[i, : len(row)] = 1
            starts = torch.tensor([len(contexts_[r]) - 1 for r in chunk])[:, None]
            hidden = decoder(
                input_ids=feed.to(self.device),
                attention_mask=torch.cat([past_mask, feed_mask], dim=-1).to(self.device),
                position_ids=(starts + torch.arange(T)[None, :]).to(self.device),
                use_cache=True,
                **{cache_kwarg(): cache},
            ).last_hidden_state
            valid = torch.arange(T)[None, :] < torch.tensor([lengths[rows.batch_index[r]] for r in chunk])[:, None]
            hidden = torch.where(valid[..., None].to(hidden.device), hidden, torch.zeros((), dtype=hidden.dtype))
            if out_hidden is None:
                out_hidden = hidden.new_zeros((len(contexts_), T, hidden.shape[-1]))
            out_hidden[torch.tensor(chunk, device=hidden.device)] = hidden
        assert out_hidden is not None
        return out_hidden

    def _teacher_pass(
        self, examples: Sequence[Any], prompts: list[list[int]], completion: torch.Tensor, lengths: list[int]
    ):
        """Main teacher log-probs/hidden, extra-context token log-probs, KL-to-base reference token log-probs."""
        B = len(examples)
        rows = _Rows([self.teacher_context_ids(ex) for ex in examples], list(range(B)))
        temps: list[float] = []
        spans: list[tuple[str, int, int]] = []  # (component name, first row, number of contexts)
        for component in self.components:
            extra = component.extra_contexts(examples)
            if extra is None:
                continue
            first = len(rows.contexts)
            for j, per_example in enumerate(extra.messages):
                for b, messages in enumerate(per_example):
                    key = (examples[b].id, f"{component.name}:{j}")
                    rows.contexts.append(self.encode(key, messages, 2 * self.training.max_prompt_tokens))
                    rows.batch_index.append(b)
            temps += [extra.temperature or self.tau] * (len(rows.contexts) - first)
            spans.append((component.name, first, len(extra.messages)))
        base_first = None
        if self.base is not None and self.base is self.teacher:
            base_first = len(rows.contexts)
            rows.contexts += prompts
            rows.batch_index += list(range(B))
            temps += [self.tau] * B
        T = completion.shape[1]
        with torch.no_grad(), self._autocast(), self.teacher.active() as module, adapters_folded(module):
            if self._frozen_fingerprint is not None:
                hidden = self._row_hidden_after_kept_contexts(
                    module, rows, completion, lengths, self._frozen_fingerprint
                )
            else:
                hidden = self._row_hidden(module, rows, completion, lengths)
            if self.fused:  # the hidden states and the head; the logits are built chunk by chunk later
                teacher_logps = (hidden[:B], head_weights(module, detach=True))
            else:
                teacher_logps = completion_logps(module, hidden[:B], self.tau)
            teacher_hidden = hidden[:B] if self.needs_hidden else None
            extra_logps = None
            if len(rows.contexts) > B:
                tokens = completion[rows.batch_index[B:]]
                extra_logps = sampled_token_logps(module, hidden[B:], tokens, torch.tensor(temps))
        context_logps = {
            name: extra_logps[first - B : first - B + n * B].view(n, B, T) for name, first, n in spans
        }
        base_logps = None
        if base_first is not None:
            base_logps = extra_logps[base_first - B :]
        elif self.base is not None:
            with torch.no_grad(), self._autocast(), self.base.active() as module, adapters_folded(module):
                hidden = self._row_hidden(module, _Rows(prompts, list(range(B))), completion, lengths)
                base_logps = sampled_token_logps(module, hidden, completion, self.tau)
        return teacher_logps, teacher_hidden, context_logps, base_logps

    def _student_pass(
        self, prompts: list[list[int]], completion: torch.Tensor, lengths: list[int], temperature: float
    ):
        with self._autocast():
            hidden = self._row_hidden(
                self.model, _Rows(prompts, list(range(len(prompts)))), completion, lengths
            )
            logps = None if self.fused else completion_logps(self.model, hidden, temperature)
        return hidden, logps

    def _fused_scores(
        self,
        hidden: torch.Tensor,
        completion: torch.Tensor,
        mask: torch.Tensor,
        temperature: float,
        teacher: tuple[torch.Tensor, HeadWeights] | None = None,
        alpha: float = 0.0,
    ) -> FusedScores:
        """Per-token ``[B,T]`` values of the fused LM head + divergence (see :mod:`fused_loss`)."""
        return fused_head_scores(
            hidden,
            head_weights(self.model),
            completion,
            mask,
            temperature,
            teacher_hidden=None if teacher is None else teacher[0],
            teacher_head=None if teacher is None else teacher[1],
            alpha=alpha,
            chunk_tokens=self.training.fused_chunk_tokens,
            compute_dtype=torch.bfloat16 if self.device.type == "cuda" else None,
        )

    # ---- the micro-steps

    def distill(self, examples: Sequence[Any], step: int, alpha: float, on_policy: bool = True):
        """A self-distillation micro-step (SDFT, UniSD variants, GKD). Returns ``(terms, metrics)``."""
        prompts = [self.prompt_ids(ex) for ex in examples]
        with self.timer.phase("generation"):
            if on_policy and self.engine is not None:
                completion = self._engine_completions(prompts, step)
                lengths = completion_mask(completion, self.eos_ids).sum(-1).tolist()
                mask = completion_mask(completion, self.eos_ids, self.training.skip_first_tokens)
            elif on_policy:
                completion = sample_completions(
                    self.model,
                    prompts,
                    max_new_tokens=self.training.max_completion_tokens,
                    temperature=self.training.temperature,
                    pad_id=self.pad_id,
                    eos_ids=self.eos_ids,
                )
                lengths = completion_mask(completion, self.eos_ids).sum(-1).tolist()
                mask = completion_mask(completion, self.eos_ids, self.training.skip_first_tokens)
            else:
                completion, mask, lengths = self.gold_completion(examples)
        with self.timer.phase("teacher"):
            teacher_logps, teacher_hidden, context_logps, base_logps = self._teacher_pass(
                examples, prompts, completion, lengths
            )
        with self.timer.phase("student"):
            student_hidden, student_logps = self._student_pass(prompts, completion, lengths, self.tau)
            fused = None
            if self.fused:
                fused = self._fused_scores(student_hidden, completion, mask, self.tau, teacher_logps, alpha)
                student_logps = teacher_logps = None
                student_tok, teacher_tok = fused.token_logps, fused.teacher_token_logps
            else:
                tokens = completion.unsqueeze(-1)
                student_tok = student_logps.gather(-1, tokens).squeeze(-1)
                teacher_tok = teacher_logps.gather(-1, tokens).squeeze(-1)
            scores = StepScores(
                mask=mask,
                tokens=completion,
                student_logps=student_logps,
                teacher_logps=teacher_logps,
                student_token_logps=student_tok,
                teacher_token_logps=teacher_tok,
                student_hidden=student_hidden if self.needs_hidden else None,
                teacher_hidden=teacher_hidden,
                context_token_logps=context_logps,
            )
            terms, metrics = self._distill_terms(scores, alpha, base_logps, fused)
            metrics["generated_tokens"] = float(mask.sum()) if on_policy else 0.0
            metrics["completion_tokens"] = float(mask.sum(-1).float().mean())
            metrics["on_policy"] = float(on_policy)
        return terms, metrics

    def _engine_completions(self, prompts: list[list[int]], step: int) -> torch.Tensor:
        """Completions sampled by the engine from the current policy: ``[B,T]``, padded after EOS.

        The policy's weights are pushed once per optimizer step (and again after the engine slept);
        each call's requests are seeded from the global torch generator, which the trainer seeds per
        process, so runs repeat and processes differ. The engine sleeps afterwards (CUDA only), giving
        training its memory back.
        """
        engine = self.engine
        if self._engine_step != step or engine.sleeping:
            engine.load_policy(self.model)
            self._engine_step = step
        seed = int(torch.randint(0, 2**31 - 1 - len(prompts), (1,)))
        rows = engine.sample(
            prompts,
            max_new_tokens=self.training.max_completion_tokens,
            temperature=self.training.temperature,
            seed=seed,
            stop_token_ids=self.eos_ids,
        )
        engine.sleep()
        width = max(1, max(len(r) for r in rows))
        completion = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            completion[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return completion.to(self.device)

    def _distill_terms(
        self,
        scores: StepScores,
        alpha: float,
        base_logps: torch.Tensor | None,
        fused: FusedScores | None = None,
    ):
        metrics: dict[str, float] = {}
        mask = scores.mask
        if fused is not None:  # per-token values already reduced chunk by chunk
            assert fused.divergence is not None
            per_token, raw_kl = fused.divergence, fused.forward_kl
        else:
            per_token = token_divergence(scores.student_logps, scores.teacher_logps, alpha)
            raw_kl = per_token.detach() if alpha == 0.0 else None  # forward KL already: not computed twice
        for component in self.components:
            per_token = component.transform_divergence(per_token, mask, metrics)
        token_w = _product(c.token_weights(scores, metrics) for c in self.components)
        seq_w = _product(c.sequence_weights(scores, metrics) for c in self.components)
        divergence = sequence_weighted_mean(masked_sequence_means(per_token, mask, token_w), seq_w)
        terms: dict[str, torch.Tensor] = {}
        if self.drops_divergence:
            metrics["divergence_unused"] = float(divergence.detach())
        else:
            terms["divergence"] = divergence
        for component in self.components:
            terms.update(component.loss_terms(scores, metrics))
        if base_logps is not None:
            terms["kl_base"] = self.variant.kl_to_base_beta * k3_to_reference(
                scores.student_token_logps, base_logps, mask
            )
        with torch.no_grad():
            if fused is not None:
                kl, entropy = fused.forward_kl, fused.entropy
            else:
                s, u = scores.student_logps.detach(), scores.teacher_logps
                kl = raw_kl if raw_kl is not None else token_divergence(s, u, 0.0)
                entropy = -(s.exp() * s).sum(-1)
            metrics["kl"] = float(weighted_sequence_mean(kl, mask))
            metrics["entropy"] = float(weighted_sequence_mean(entropy, mask))
        return terms, metrics

    def sft(self, examples: Sequence[Any], step: int):
        """Cross-entropy on the gold demonstrations (completion tokens only). Returns ``(terms, metrics)``."""
        prompts = [self.prompt_ids(ex) for ex in examples]
        with self.timer.phase("student"):
            completion, mask, lengths = self.gold_completion(examples)
            hidden, logps = self._student_pass(prompts, completion, lengths, 1.0)
            if self.fused:
                token_logps = self._fused_scores(hidden, completion, mask, 1.0).token_logps
            else:
                token_logps = logps.gather(-1, completion.unsqueeze(-1)).squeeze(-1)
            terms = {"cross_entropy": weighted_sequence_mean(-token_logps, mask)}
            metrics = {"completion_tokens": float(mask.sum(-1).float().mean()), "generated_tokens": 0.0}
        return terms, metrics

    def gkd_on_policy(self, lmbda: float) -> bool:
        """GKD's coin: on-policy student samples with probability ``lmbda`` (seeded), else gold."""
        return self._policy_rng.random() < lmbda


def _teacher_fingerprint(teacher: TeacherWeights, device: torch.device) -> str:
    """A hash of everything the teacher's function depends on: architecture, device, the base weights and
    the teacher's own adapter (names and dtypes included); other adapters are left out."""
    from unisd_components.teachers import AdapterTeacher, DisabledAdapterTeacher

    module = teacher.module
    named = []
    for name, param in module.named_parameters():
        if "lora_" in name:
            if isinstance(teacher, DisabledAdapterTeacher):
                continue
            if isinstance(teacher, AdapterTeacher) and f".{teacher.name}." not in name:
                continue
        named.append((f"{name}:{param.dtype}", param))
    config = getattr(module, "config", None)
    salt = f"{device.type}|{config.to_json_string(use_diff=False) if config is not None else type(module)}"
    return tensors_fingerprint(named, salt=salt)


def k3_to_reference(student_tok: torch.Tensor, ref_tok: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(student || reference) on sampled tokens: ``exp(r) - r - 1``, ``r = ref - student``."""
    r = ref_tok.detach().float() - student_tok.float()
    return weighted_sequence_mean(torch.expm1(r) - r, mask)


def _product(weights) -> torch.Tensor | None:
    out = None
    for w in weights:
        if w is not None:
            out = w if out is None else out * w
    return out
