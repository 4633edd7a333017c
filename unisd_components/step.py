"""One micro-step of self-distillation: sample, score under the teachers, build the loss, backward.

Read top to bottom, a distillation micro-step is:

1. **generation**: sample one completion per prompt from the student (``generate`` with the KV cache,
   prompts prefilled in groups of similar length then decoded as one batch, a LoRA adapter folded into
   the weights, eval mode, no gradient, pure temperature sampling: no top-k/top-p, so the
   samples are on-policy for the distribution the loss is computed at). The prompts' prefill is the
   student pass's own prompt pass (step 3 runs it first, with gradient) whenever a training-mode forward
   computes what sampling does (no active dropout, no activation checkpointing): each prompt runs once
   per step. Or, when the trainer is given a generation engine (:mod:`unisd_components.vllm_engine`), the
   same rule in vLLM, from the current weights pushed into it once per optimizer step: the engine only
   proposes tokens, every log-prob of the loss is computed below by the training model;
2. **teacher**: with the teacher weights, one gradient-free pass over every teacher row: the main
   demonstration context (full-vocabulary log-probs, and final hidden states for feature matching),
   then every component's extra contexts (K agreement contexts, the negative context) of which only
   the sampled-token log-probs are kept, and the KL-to-base reference rows when the base weights are
   the teacher's. Each row stops at its completion's EOS, and rows are sorted by length and cut into
   chunks of a token budget, so little compute goes to padding. Contexts that share a long prefix
   (UniSD*'s main and negative contexts repeat the prompt, agreement contexts with the same donor repeat
   its block) run it once. An EMA teacher runs with its adapter folded into the weights; a frozen teacher
   keeps its contexts' KV for the process's later trials
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
    common_prefix_worth_sharing,
    context_prefix,
    forward_overhead_tokens,
    generate_bucketed,
    hidden_after_prefixes,
    keep_context_prefix,
    length_buckets,
    prefix_kv,
    shared_prefix_lengths,
)
from unisd_components.registry import Component, StepScores
from unisd_components.scoring import (
    completion_hidden,
    completion_logps,
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
# A prefix shared by teacher rows is run once when at least this long: a shorter one (the chat template's
# system turn) saves less than the extra forward costs.
_MIN_SHARED_PREFIX = 32
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
    prefixes: Sequence[list[tuple[torch.Tensor, torch.Tensor]]] | None = None,
) -> torch.Tensor:
    """One sampled completion per prompt (token lists): ``[B,T]``, padded after EOS with ``pad_id``.

    The prompts are prefilled in groups of similar length (:func:`unisd_components.prefill.generate_bucketed`)
    and a LoRA student samples with its adapter folded into its weights
    (:func:`unisd_components.lora.adapters_folded`): the same distribution, fewer operations.
    ``prefixes``: each prompt's KV over all its tokens but the last under the current weights (the
    student pass's, detached); then no prefill runs here.
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
                prefixes=prefixes,
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
        self._base_fingerprint: str | None = None  # an EMA adapter teacher's base weights (computed when asked)
        # The student's prompt pass serves its own sampling too when a training-mode forward computes what
        # sampling does (no active dropout) and keeps its cache (no gradient checkpointing).
        self._shares_prompt_pass = (
            engine is None and not training.gradient_checkpointing and not _has_active_dropout(model)
        )

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
        rows run in groups of similar length (:func:`~unisd_components.prefill.length_buckets`: the
        fewest tokens computed, counting a forward's own cost, at most ``_TOKEN_BUDGET`` a forward).
        When every context begins with the same tokens (the chat template's system turn) and running them
        once saves more than a forward costs, they run once and each row runs the rest after their KV.
        """
        common = common_prefix_worth_sharing(rows.contexts, forward_overhead_tokens(self.device))
        if common:
            shared = prefix_kv(module, [rows.contexts[0][:common]], pad_id=self.pad_id)
            if shared is not None:
                suffixes = [c[common:] for c in rows.contexts]
                return self._hidden_after(module, shared * len(suffixes), suffixes, rows, completion, lengths)
        T = completion.shape[1]
        tokens = completion.tolist()
        full = [rows.contexts[r] + tokens[b][: lengths[b]] for r, b in enumerate(rows.batch_index)]
        groups = length_buckets(
            [len(f) for f in full], forward_overhead_tokens(self.device), max_tokens=self._budget()
        )
        pieces: dict[int, torch.Tensor] = {}
        for group in groups:
            ids, mask = pad_left([full[r] for r in group], self.pad_id)
            row_lengths = torch.tensor([lengths[rows.batch_index[r]] for r in group])
            hidden = completion_hidden(module, ids.to(self.device), mask.to(self.device), T, row_lengths)
            if len(groups) == 1 and group == sorted(group):
                return hidden
            for i, r in enumerate(group):
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
        prefixes = [context_prefix(fingerprint, c[:-1]) for c in contexts_]
        missing = [r for r, kv in enumerate(prefixes) if kv is None]
        if missing:
            computed = prefix_kv(
                module, [contexts_[r][:-1] for r in missing], pad_id=self.pad_id, token_budget=self._budget()
            )
            if computed is None:  # not a plain cache: score the whole rows as usual
                return self._row_hidden(module, rows, completion, lengths)
            for r, kv in zip(missing, computed, strict=True):
                prefixes[r] = kv
                keep_context_prefix(fingerprint, contexts_[r][:-1], kv)
        return self._hidden_after(module, prefixes, [[c[-1]] for c in contexts_], rows, completion, lengths)

    def _unmoved_teacher_fingerprint(self, contexts_: list[list[int]]) -> str | None:
        """The base weights' fingerprint when the teacher is an EMA adapter that has not moved yet (it is the
        base model, :meth:`AdapterTeacher.is_base`) and an earlier frozen-teacher trial of this process kept
        every one of these contexts under the base weights; else None. The EMA teacher's first steps then
        cost only their completions."""
        from unisd_components.teachers import AdapterTeacher

        if not isinstance(self.teacher, AdapterTeacher) or any(len(c) < 2 for c in contexts_):
            return None
        if self._base_fingerprint is None:
            self._base_fingerprint = _teacher_fingerprint(self.teacher, self.device, as_base=True)
        if any(context_prefix(self._base_fingerprint, c[:-1]) is None for c in contexts_):
            return None
        return self._base_fingerprint if self.teacher.is_base() else None

    def _row_hidden_sharing_prefixes(
        self, module: nn.Module, rows: _Rows, completion: torch.Tensor, lengths: list[int]
    ) -> torch.Tensor:
        """:meth:`_row_hidden` where contexts share long prefixes (UniSD*'s teacher rows: the main and the
        negative context repeat the prompt, agreement contexts with the same donor repeat its block): each
        distinct shared prefix runs once, then each row runs only the rest of its context and its
        completion after that prefix's KV. Same hidden states, up to float summation order."""
        contexts_ = rows.contexts
        splits = shared_prefix_lengths(contexts_, min_tokens=_MIN_SHARED_PREFIX)
        if not any(splits):
            return self._row_hidden(module, rows, completion, lengths)
        # A row that shares nothing keeps its whole context but the last token as its own prefix.
        splits = [s or len(c) - 1 for s, c in zip(splits, contexts_, strict=True)]
        if min(splits) < 1:
            return self._row_hidden(module, rows, completion, lengths)
        distinct = sorted({tuple(c[:s]) for c, s in zip(contexts_, splits, strict=True)})
        computed = prefix_kv(
            module, [list(p) for p in distinct], pad_id=self.pad_id, token_budget=self._budget()
        )
        if computed is None:
            return self._row_hidden(module, rows, completion, lengths)
        by_prefix = dict(zip(distinct, computed, strict=True))
        prefixes = [by_prefix[tuple(c[:s])] for c, s in zip(contexts_, splits, strict=True)]
        suffixes = [c[s:] for c, s in zip(contexts_, splits, strict=True)]
        return self._hidden_after(module, prefixes, suffixes, rows, completion, lengths)

    def _hidden_after(
        self,
        module: nn.Module,
        prefixes: list,
        suffixes: list[list[int]],
        rows: _Rows,
        completion: torch.Tensor,
        lengths: list[int],
    ) -> torch.Tensor:
        """Completion hidden states ``[R,T,H]`` of rows ``[prefix_r | suffix_r | completion]`` whose
        prefixes' KV is already computed: each row feeds its suffix and its completion but the last token."""
        tokens = completion.tolist()
        feeds, first, row_lengths = [], [], []
        for r, b in enumerate(rows.batch_index):
            feeds.append(suffixes[r] + tokens[b][: max(lengths[b], 1) - 1])
            first.append(len(suffixes[r]) - 1)
            row_lengths.append(lengths[b])
        return hidden_after_prefixes(
            module,
            prefixes,
            feeds,
            first,
            completion.shape[1],
            row_lengths,
            pad_id=self.pad_id,
            token_budget=self._budget(),
        )

    def _budget(self) -> int:
        return _TOKEN_BUDGET.get(self.device.type, _DEFAULT_TOKEN_BUDGET)

    def _prompt_kv(self, prompts: list[list[int]]):
        """The student's KV over each prompt but its last token, with gradient: it serves both the sampling
        (detached) and the student pass (:meth:`_student_pass`). None when the passes cannot share it."""
        if not self._shares_prompt_pass or min(len(p) for p in prompts) < 2:
            return None
        with self._autocast():
            return prefix_kv(
                self.model, [p[:-1] for p in prompts], pad_id=self.pad_id, token_budget=self._budget()
            )

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
        fingerprint = self._frozen_fingerprint or self._unmoved_teacher_fingerprint(rows.contexts)
        with torch.no_grad(), self._autocast(), self.teacher.active() as module, adapters_folded(module):
            if fingerprint is not None:
                hidden = self._row_hidden_after_kept_contexts(module, rows, completion, lengths, fingerprint)
            else:
                hidden = self._row_hidden_sharing_prefixes(module, rows, completion, lengths)
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
        self,
        prompts: list[list[int]],
        completion: torch.Tensor,
        lengths: list[int],
        temperature: float,
        prompt_kv: list | None = None,
    ):
        rows = _Rows(prompts, list(range(len(prompts))))
        with self._autocast():
            if prompt_kv is None:
                hidden = self._row_hidden(self.model, rows, completion, lengths)
            else:
                hidden = self._hidden_after(
                    self.model, prompt_kv, [[p[-1]] for p in prompts], rows, completion, lengths
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
        prompt_kv = None
        if on_policy and self.engine is None:
            with self.timer.phase("student"):  # the student's prompt pass, shared with the sampling
                prompt_kv = self._prompt_kv(prompts)
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
                    prefixes=None
                    if prompt_kv is None
                    else [[(k.detach(), v.detach()) for k, v in row] for row in prompt_kv],
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
            student_hidden, student_logps = self._student_pass(
                prompts, completion, lengths, self.tau, prompt_kv
            )
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


def _teacher_fingerprint(teacher: TeacherWeights, device: torch.device, as_base: bool = False) -> str:
    """A hash of everything the teacher's function depends on: architecture, device, the base weights and
    the teacher's own adapter (names and dtypes included); other adapters are left out. ``as_base``: no
    adapter at all (what a disabled-adapter teacher hashes), for an adapter teacher that is the base."""
    from unisd_components.teachers import AdapterTeacher, DisabledAdapterTeacher

    module = teacher.module
    named = []
    for name, param in module.named_parameters():
        if "lora_" in name:
            if as_base or isinstance(teacher, DisabledAdapterTeacher):
                continue
            if isinstance(teacher, AdapterTeacher) and f".{teacher.name}." not in name:
                continue
        named.append((f"{name}:{param.dtype}", param))
    config = getattr(module, "config", None)
    salt = f"{device.type}|{config.to_json_string(use_diff=False) if config is not None else type(module)}"
    return tensors_fingerprint(named, salt=salt)


def _has_active_dropout(model: nn.Module) -> bool:
    """Whether a training-mode forward of ``model`` draws dropout masks (modules, or config rates)."""
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    settings = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    return any(
        ("dropout" in name or "pdrop" in name)
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and value > 0
        for name, value in settings.items()
    )


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
