"""PPL fit and retention: how well a model fits the task, and how far it drifted from its base model.

Definitions (unisd-method.md, section 4; token ``t`` ranges over completion tokens only, the prompt is the
example's chat messages rendered with the tokenizer's chat template and a generation prompt):

- ``ppl_fit``: perplexity of the gold demonstrations under the evaluated model, TOKEN-WEIGHTED over the
  whole set, ``exp(sum -log p(y*_t | x, y*_<t) / number of demonstration tokens)``. Lower: fits the task.
- ``ppl_ret``: for each prompt, the evaluated model's greedy completion ``y`` scored by the BASE model,
  ``ppl_i = exp(-mean_t log p_base(y_t | x, y_<t))``; ``ppl_ret`` is the mean of ``ppl_i`` over prompts
  (PROMPT-WEIGHTED, as the reference code computes it). Lower: the model still speaks like its base.
- ``ret_jsd``: Jensen-Shannon divergence (nats, at most ln 2) between the base and the evaluated model's
  full next-token distributions at every position of those completions: mean over an example's tokens,
  then over examples (as the reference computes it).
- ``ppl_ret_reverse``: the base model's greedy completions scored by the evaluated model, same averaging
  as ``ppl_ret``. The base completions are generated once per (base model, benchmark, prompt version,
  max_new_tokens) by :func:`greedy_completions` (whichever trial gets there first) and cached as JSON in
  ``cache_dir``, so the variants of a study share them.
- Each is also reported per benchmark (``<bench>.ppl_ret``, ``<bench>.ret_jsd``,
  ``<bench>.ppl_ret_reverse``), besides the pooled value over every prompt.

Completions end at the first end-of-sequence token (excluded) and are scored as the generated token ids,
never re-tokenized. Empty completions are skipped (no tokens to score). Everything runs batched, under
``torch.inference_mode``, with logits computed only at completion positions, log-softmax in fp32.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from unisd_components.cache import read_json, tensors_fingerprint, write_json_atomic
from unisd_components.chat import encode_prompt, render_prompt
from unisd_components.generation import greedy_kwargs, stated_decoding
from unisd_components.lora import adapters_folded
from unisd_components.prefill import (
    cache_from_rows,
    cache_kwarg,
    forward_overhead_tokens,
    generate_bucketed,
    kept_prefill,
    length_buckets,
)

__all__ = ["greedy_completions", "ppl_fit", "render_prompt", "retention", "score_completions"]


def _prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    # The trainer's own rendering (unisd_components.chat), so retention scores the prompts training saw.
    return encode_prompt(tokenizer, messages)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _eos_ids(tokenizer, model) -> set[int]:
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(source)
    return ids


def _left_padded(
    sequences: Sequence[Sequence[int]], pad_id: int, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad to one batch; positions count real tokens only, so padding never shifts a prediction."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


# The base model's prompt forward (last-position logits and KV cache) per batch of prompts, kept for the
# process's later trials: every trial scores its completions under the same base model after the same
# prompts, and on a CPU the prompts are most of that cost. Keyed by the model object (weakly) and a
# fingerprint of its weights, within a memory budget (large models and sets simply recompute).
_PREFILLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PREFILL_BUDGET_BYTES = 1 << 30


def _cache_bytes(cache) -> int | None:
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    total = 0
    for layer in layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if not isinstance(tensor, torch.Tensor):
                return None
            total += tensor.numel() * tensor.element_size()
    return total


def _keep_prefill(model, key, first: torch.Tensor | None, cache) -> None:
    """Keep ``(first, cache)``; ``first`` None: the cache stops before the prompts' last token."""
    size = _cache_bytes(cache)
    if size is None:
        return
    size += 0 if first is None else int(first.numel() * first.element_size())
    kept = _PREFILLS.setdefault(model, {})
    used = sum(b for _, _, b in kept.values())
    if used + size <= _PREFILL_BUDGET_BYTES:
        kept[key] = (first, copy.deepcopy(cache), size)


def _completion_logprobs(
    model,
    prompts: Sequence[Sequence[int]],
    completion_sets: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
    reuse_prefill: str | None = None,
) -> list[list[torch.Tensor]]:
    """Full-vocabulary fp32 log-probabilities at each completion token's prediction position.

    ``completion_sets``: one or more continuations per prompt (e.g. the model's own completion, the base
    model's, the gold demonstration). The left-padded prompts run ONCE; their KV cache then serves every
    set (on a CPU the prompt is most of the cost). The last prompt position predicts each completion's
    first token; a set's continuation pass (right-padded, positions continuing each row's real length)
    predicts the rest, so logits are computed only where completion tokens are predicted.
    Returns, per set, one ``[len(completion), vocab]`` tensor per row. ``reuse_prefill``: a fingerprint
    of ``model``'s weights; the prompts' forward is then kept and reused by later calls (the base model).
    """
    ids, mask, positions = _left_padded(prompts, pad_id, _device(model))
    key = (reuse_prefill, pad_id, tuple(tuple(p) for p in prompts)) if reuse_prefill else None
    kept = _PREFILLS.get(model, {}).get(key) if key is not None else None
    rows_kv = None
    if kept is None and all(len(p) > 1 for p in prompts):
        rows_kv = [kept_prefill(model, list(p)[:-1]) for p in prompts]  # this evaluation's generation
        rows_kv = None if any(r is None for r in rows_kv) else rows_kv
    first = cache = None
    if kept is not None:
        first, cache = kept[0], copy.deepcopy(kept[1])
    elif rows_kv is not None:  # every set's continuation starts with the prompt's last token
        cache = cache_from_rows(rows_kv, ids.shape[1] - 1)
        if key is not None:
            _keep_prefill(model, key, None, cache)
    else:
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        first = out.logits[:, -1, :].float()  # predicts token 0 of every completion
        cache = out.past_key_values
        if key is not None:
            _keep_prefill(model, key, first, cache)
    lengths = mask.sum(-1, keepdim=True)
    # A set equal to an earlier one (the base model's own completions, when it is the evaluated model) is
    # scored once.
    distinct = [i for i, s in enumerate(completion_sets) if all(completion_sets[j] != s for j in range(i))]
    results: list[list[torch.Tensor]] = []
    for index in distinct:
        completions = completion_sets[index]
        # With a prompt cache short of the last prompt token, the continuation feeds that token first.
        lead = [[] for _ in prompts] if first is not None else [[list(p)[-1]] for p in prompts]
        feeds = [lead[row] + list(c)[:-1] for row, c in enumerate(completions)]  # the last token predicts nothing
        width = max((len(f) for f in feeds), default=0)
        rest = None
        if width > 0:
            cont = torch.full((len(prompts), width), pad_id, dtype=torch.long)
            cont_mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for row, feed in enumerate(feeds):
                if feed:
                    cont[row, : len(feed)] = torch.tensor(feed, dtype=torch.long)
                    cont_mask[row, : len(feed)] = 1
            device = ids.device
            # The cache grows in place: every set but the last continues from a copy of the prompt's.
            set_cache = cache if index == distinct[-1] else copy.deepcopy(cache)
            past_mask = mask if first is not None else mask[:, :-1]
            start = lengths if first is not None else lengths - 1
            rest = model(
                input_ids=cont.to(device),
                attention_mask=torch.cat([past_mask, cont_mask.to(device)], dim=-1),
                position_ids=start + torch.arange(width, device=device)[None, :],
                **{cache_kwarg(): set_cache},
                use_cache=True,
            ).logits.float()
        rows = []
        for row, completion in enumerate(completions):
            n = len(completion)
            if first is None:
                logits = rest[row, :n] if rest is not None else torch.zeros((0, 1))
            else:
                logits = (
                    first[row : row + 1]
                    if rest is None
                    else torch.cat([first[row : row + 1], rest[row, : n - 1]])
                )
            rows.append(F.log_softmax(logits[:n], dim=-1))
        results.append(rows)
    return [
        results[distinct.index(next(j for j in distinct if completion_sets[j] == s))] for s in completion_sets
    ]


def _batches(order: list[int], batch_size: int):
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _length_groups(model, rows: list[int], lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """``rows`` in groups of at most ``batch_size`` of similar ``lengths[row]`` (little padding)."""
    overhead = forward_overhead_tokens(_device(model))
    groups = length_buckets([lengths[r] for r in rows], overhead, max_rows=batch_size)
    return [[rows[i] for i in group] for group in groups]


@torch.inference_mode()
def score_completions(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    other_model=None,
) -> dict[str, Any]:
    """Per-completion token log-probabilities under ``model``, and optionally the JSD to ``other_model``.

    Returns ``{"token_logprobs": [tensor [n_i]] per row, "jsd": [tensor [n_i]] per row or None}``; rows
    with an empty completion get empty tensors. Rows are batched in groups of similar prompt length.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_rows = len(prompts)
    token_logprobs: list[torch.Tensor] = [torch.zeros(0)] * n_rows
    jsd: list[torch.Tensor] | None = [torch.zeros(0)] * n_rows if other_model is not None else None
    rows = [i for i in range(n_rows) if len(completions[i]) > 0]
    for batch in _length_groups(model, rows, [len(p) for p in prompts], batch_size):
        batch_prompts = [prompts[i] for i in batch]
        batch_completions = [completions[i] for i in batch]
        (logps,) = _completion_logprobs(model, batch_prompts, [batch_completions], pad_id)
        others = (
            _completion_logprobs(other_model, batch_prompts, [batch_completions], pad_id)[0]
            if other_model is not None
            else None
        )
        for k, row in enumerate(batch):
            target = torch.tensor(list(completions[row]), device=logps[k].device)
            token_logprobs[row] = logps[k].gather(-1, target[:, None])[:, 0].cpu()
            if others is not None and jsd is not None:
                jsd[row] = _jsd(logps[k], others[k].to(logps[k].device)).cpu()
    return {"token_logprobs": token_logprobs, "jsd": jsd}


def _jsd(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per-row JSD(p, q) = (KL(p || m) + KL(q || m)) / 2 with m = (p + q) / 2, from log-probabilities."""
    vocab = min(logp.shape[-1], logq.shape[-1])
    logp, logq = logp[..., :vocab], logq[..., :vocab]
    logm = torch.logsumexp(torch.stack([logp, logq]), dim=0) - math.log(2.0)
    kl_pm = (logp.exp() * (logp - logm)).sum(-1)
    kl_qm = (logq.exp() * (logq - logm)).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).clamp(min=0.0)


@torch.inference_mode()
def greedy_completions(
    model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int = 8
) -> list[list[int]]:
    """Greedy completions (token ids, cut before the first EOS), batched over length-sorted prompts."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = _eos_ids(tokenizer, model)
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for batch in _batches(order, batch_size):
        # greedy under one stated rule, whatever the model ships; prompts prefilled in length groups
        with stated_decoding(model), adapters_folded(model):
            generated = generate_bucketed(
                model,
                [prompts[i] for i in batch],
                pad_id=pad_id,
                max_new_tokens=max_new_tokens,
                **greedy_kwargs(),
            )
        for k, row in enumerate(batch):
            tokens = generated[k].tolist()
            cut = next((j for j, t in enumerate(tokens) if t in eos), len(tokens))
            out[row] = tokens[:cut]
    return out


def _per_prompt_ppl(token_logprobs: Sequence[torch.Tensor]) -> list[float]:
    return [math.exp(-float(lp.mean())) for lp in token_logprobs if lp.numel() > 0]


def ppl_fit(model, tokenizer, examples: Sequence, *, batch_size: int = 8) -> float:
    """Token-weighted perplexity of the gold demonstrations (``Example.demonstration``) given their prompts.

    The demonstration is tokenized on its own (no special tokens) and appended to the rendered prompt;
    the end-of-turn token is not scored, so chat and plain models are measured on the same tokens.
    """
    if not examples:
        raise ValueError("ppl_fit needs at least one example")
    prompts = [_prompt_ids(tokenizer, ex.messages) for ex in examples]
    scored = score_completions(
        model, tokenizer, prompts, _gold_ids(tokenizer, examples), batch_size=batch_size
    )
    return _token_weighted_ppl(scored["token_logprobs"])


def _gold_ids(tokenizer, examples: Sequence) -> list[list[int]]:
    return [tokenizer(ex.demonstration, add_special_tokens=False)["input_ids"] for ex in examples]


def _token_weighted_ppl(token_logprobs: Sequence[torch.Tensor]) -> float:
    return math.exp(-float(torch.cat([lp for lp in token_logprobs if lp.numel() > 0]).mean()))


def model_fingerprint(model) -> str:
    """A short hash of a model's architecture and weights, so cached base completions follow the weights.

    Hashes the config and a strided sample of every parameter tensor (cheap even for large models).
    """
    return tensors_fingerprint(model.named_parameters(), salt=model.config.to_json_string(use_diff=False))


def _cached_base_completions(
    base_model,
    tokenizer,
    examples: Sequence,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    cache_dir: Path | None,
) -> list[list[int]]:
    """Base greedy completions (:func:`greedy_completions`, the only producer), read from / added to one
    JSON file per (base model, benchmark)."""
    if cache_dir is None:
        return greedy_completions(
            base_model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = model_fingerprint(base_model)
    result: list[list[int] | None] = [None] * len(examples)
    by_file: dict[Path, dict[str, list[int]]] = {}
    for i, ex in enumerate(examples):
        version = ex.metadata.get("prompt_version", 0)
        path = cache_dir / f"base-completions-{fingerprint}-{ex.benchmark}-v{version}-n{max_new_tokens}.json"
        if path not in by_file:  # an unreadable file is discarded with a warning and generated again
            by_file[path] = read_json(path, check=lambda v: isinstance(v, dict)) or {}
        if ex.id in by_file[path]:
            result[i] = by_file[path][ex.id]
    missing = [i for i, r in enumerate(result) if r is None]
    if missing:
        fresh = greedy_completions(
            base_model,
            tokenizer,
            [prompts[i] for i in missing],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        touched = set()
        for i, tokens in zip(missing, fresh, strict=True):
            result[i] = tokens
            ex = examples[i]
            version = ex.metadata.get("prompt_version", 0)
            path = (
                cache_dir / f"base-completions-{fingerprint}-{ex.benchmark}-v{version}-n{max_new_tokens}.json"
            )
            by_file[path][ex.id] = tokens
            touched.add(path)
        for path in touched:  # atomic: a concurrent reader sees the old or the new file, never half
            write_json_atomic(path, by_file[path])
    return [r if r is not None else [] for r in result]


@torch.inference_mode()
def _scores_by_set(
    model, base_model, tokenizer, prompts, sets: list[Sequence[Sequence[int]]], batch_size: int
) -> tuple[list[list[torch.Tensor]], list[torch.Tensor], list[torch.Tensor]]:
    """Sampled-token log-probs of every set under ``model``, of ``sets[0]`` under ``base_model``, and the
    per-token JSD between the two on ``sets[0]``. Each model runs each prompt once for all its sets."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_rows = len(prompts)
    model_lp = [[torch.zeros(0)] * n_rows for _ in sets]
    base_lp, jsd = [torch.zeros(0)] * n_rows, [torch.zeros(0)] * n_rows
    base_fingerprint = model_fingerprint(base_model)  # the base trial keeps its prompts' pass for the others
    for batch in _length_groups(model, list(range(n_rows)), [len(p) for p in prompts], batch_size):
        batch_prompts = [prompts[i] for i in batch]
        batch_sets = [[s[i] for i in batch] for s in sets]
        same = model is base_model
        ours = _completion_logprobs(
            model, batch_prompts, batch_sets, pad_id, reuse_prefill=base_fingerprint if same else None
        )
        base = (
            ours[0]
            if same
            else _completion_logprobs(
                base_model, batch_prompts, batch_sets[:1], pad_id, reuse_prefill=base_fingerprint
            )[0]
        )
        for k, row in enumerate(batch):
            for index, completions in enumerate(batch_sets):
                target = torch.tensor(list(completions[k]), dtype=torch.long, device=ours[index][k].device)
                model_lp[index][row] = ours[index][k].gather(-1, target[:, None])[:, 0].cpu()
            target = torch.tensor(list(batch_sets[0][k]), dtype=torch.long, device=base[k].device)
            base_lp[row] = base[k].gather(-1, target[:, None])[:, 0].cpu()
            jsd[row] = (
                torch.zeros(len(target)) if same else _jsd(ours[0][k], base[k].to(ours[0][k].device)).cpu()
            )
    return model_lp, base_lp, jsd


def retention(
    model,
    base_model,
    tokenizer,
    examples: Sequence,
    *,
    max_new_tokens: int = 256,
    cache_dir: Path | None = None,
    batch_size: int = 8,
    completions: Sequence[Sequence[int]] | None = None,
    with_ppl_fit: bool = False,
    base_completions: Sequence[Sequence[int]] | None = None,
) -> dict[str, float]:
    """``{"ppl_ret", "ret_jsd", "ppl_ret_reverse"}`` of ``model`` against ``base_model`` on ``examples``
    (plus ``ppl_fit`` with ``with_ppl_fit``: the gold demonstrations share the prompts' forward pass).

    Both models must share ``tokenizer`` (and its vocabulary). ``completions``: the evaluated model's
    greedy completions as token ids, when the caller already has them (saves one generation pass);
    otherwise they are generated here. Prompts whose completion is empty are left out of the means.

    ``base_completions``: the base model's completions for the reverse direction, when the caller owns
    their definition (:func:`harness.evaluation.evaluate_model`: the base model's own lm-eval completions).
    Otherwise they have one producer, whatever the order in which trials run: :func:`greedy_completions`
    of the base model (token ids up to EOS), cached per base model in ``cache_dir``.

    Per benchmark (``ex.benchmark``) as well as pooled: ``<bench>.ppl_ret``, ``<bench>.ret_jsd``,
    ``<bench>.ppl_ret_reverse``. ``ret_jsd`` is the mean over an example's tokens, then over examples.
    """
    if not examples:
        raise ValueError("retention needs at least one example")
    prompts = [_prompt_ids(tokenizer, ex.messages) for ex in examples]
    if completions is None:
        completions = greedy_completions(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
    if base_completions is None:
        base_completions = _cached_base_completions(
            base_model, tokenizer, examples, prompts, max_new_tokens, batch_size, cache_dir
        )
    sets: list[Sequence[Sequence[int]]] = [completions, base_completions]
    if with_ppl_fit:
        sets.append(_gold_ids(tokenizer, examples))
    model_lp, base_lp, jsd = _scores_by_set(model, base_model, tokenizer, prompts, sets, batch_size)
    groups: dict[str, list[int]] = {"": list(range(len(examples)))}
    benchmarks = sorted({getattr(ex, "benchmark", "") for ex in examples} - {""})
    for bench in benchmarks:
        groups[f"{bench}."] = [i for i, ex in enumerate(examples) if getattr(ex, "benchmark", "") == bench]
    metrics: dict[str, float] = {}
    for prefix, rows in groups.items():
        forward_ppl = _per_prompt_ppl([base_lp[i] for i in rows])
        reverse_ppl = _per_prompt_ppl([model_lp[1][i] for i in rows])
        jsd_means = [float(jsd[i].mean()) for i in rows if jsd[i].numel() > 0]
        metrics[f"{prefix}ppl_ret"] = _mean(forward_ppl)
        metrics[f"{prefix}ret_jsd"] = _mean(jsd_means)
        metrics[f"{prefix}ppl_ret_reverse"] = _mean(reverse_ppl)
    if with_ppl_fit:
        metrics["ppl_fit"] = _token_weighted_ppl(model_lp[-1])
    return metrics


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
