"""PPL fit and retention: how well a model fits the task, and how far it drifted from its base model.

Definitions (unisd-method.md, section 4; token ``t`` ranges over completion tokens only, the prompt is the
example's chat messages rendered with the tokenizer's chat template and a generation prompt):

- ``ppl_fit``: perplexity of the gold demonstrations under the evaluated model, TOKEN-WEIGHTED over the
  whole set, ``exp(sum -log p(y*_t | x, y*_<t) / number of demonstration tokens)``. Lower: fits the task.
- ``ppl_ret``: for each prompt, the evaluated model's greedy completion ``y`` scored by the BASE model,
  ``ppl_i = exp(-mean_t log p_base(y_t | x, y_<t))``; ``ppl_ret`` is the mean of ``ppl_i`` over prompts
  (PROMPT-WEIGHTED, as the reference code computes it). Lower: the model still speaks like its base.
- ``ret_jsd``: Jensen-Shannon divergence (nats, at most ln 2) between the base and the evaluated model's
  full next-token distributions at every position of those completions, mean over all tokens.
- ``ppl_ret_reverse``: the base model's greedy completions scored by the evaluated model, same averaging
  as ``ppl_ret``. The base completions are generated once per (base model, benchmark, prompt version,
  max_new_tokens) and cached as JSON in ``cache_dir``, so the variants of a study share them.

Completions end at the first end-of-sequence token (excluded) and are scored as the generated token ids,
never re-tokenized. Empty completions are skipped (no tokens to score). Everything runs batched, under
``torch.inference_mode``, with logits computed only at completion positions, log-softmax in fp32.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["greedy_completions", "ppl_fit", "render_prompt", "retention", "score_completions"]


def render_prompt(tokenizer, messages: Sequence[dict]) -> str:
    """The prompt text a chat model sees: chat template + generation prompt; plain user text otherwise.

    lm-eval renders our tasks the same way (``apply_chat_template=True`` with a single user turn), so
    retention and accuracy look at the same prompts.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages if m["role"] in ("system", "user"))


def _prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    # A rendered chat template already carries its special tokens (BOS included where the model uses one).
    chat = bool(getattr(tokenizer, "chat_template", None))
    return tokenizer(render_prompt(tokenizer, messages), add_special_tokens=not chat)["input_ids"]


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


def _completion_logprobs(
    model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> list[torch.Tensor]:
    """Full-vocabulary fp32 log-probabilities at each completion token's prediction position.

    Sequences are left-padded so every completion ends at the right edge: the logits of the last
    ``max completion length + 1`` positions cover all of them (``logits_to_keep``), not the prompt's.
    Returns one ``[len(completion), vocab]`` tensor per row.
    """
    full = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    ids, mask, positions = _left_padded(full, pad_id, _device(model))
    keep = max(len(c) for c in completions) + 1
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
    logits = logits[:, -keep:-1, :].float()  # position j predicts token j + 1
    out = []
    for row, completion in enumerate(completions):
        n = len(completion)
        out.append(F.log_softmax(logits[row, keep - 1 - n :], dim=-1))
    return out


def _batches(order: list[int], batch_size: int):
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


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
    with an empty completion get empty tensors. Batches are formed over rows sorted by length.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_rows = len(prompts)
    token_logprobs: list[torch.Tensor] = [torch.zeros(0)] * n_rows
    jsd: list[torch.Tensor] | None = [torch.zeros(0)] * n_rows if other_model is not None else None
    rows = [i for i in range(n_rows) if len(completions[i]) > 0]
    rows.sort(key=lambda i: len(prompts[i]) + len(completions[i]))
    for batch in _batches(rows, batch_size):
        batch_prompts = [prompts[i] for i in batch]
        batch_completions = [completions[i] for i in batch]
        logps = _completion_logprobs(model, batch_prompts, batch_completions, pad_id)
        others = (
            _completion_logprobs(other_model, batch_prompts, batch_completions, pad_id)
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
        ids, mask, _ = _left_padded([prompts[i] for i in batch], pad_id, _device(model))
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad_id,
        )
        for k, row in enumerate(batch):
            tokens = generated[k, ids.shape[1] :].tolist()
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
    golds = [tokenizer(ex.demonstration, add_special_tokens=False)["input_ids"] for ex in examples]
    scored = score_completions(model, tokenizer, prompts, golds, batch_size=batch_size)["token_logprobs"]
    total = torch.cat([lp for lp in scored if lp.numel() > 0])
    return math.exp(-float(total.mean()))


def model_fingerprint(model) -> str:
    """A short hash of a model's architecture and weights, so cached base completions follow the weights.

    Hashes the config and a strided sample of every parameter tensor (cheap even for large models).
    """
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)][:256].float().cpu()
            digest.update(name.encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def _cached_base_completions(
    base_model,
    tokenizer,
    examples: Sequence,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    cache_dir: Path | None,
    known: Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """Base greedy completions, read from / added to one JSON file per (base model, benchmark).

    ``known``: the base model's own greedy completions when the caller has them (evaluating the base
    model itself): they fill the cache instead of a second generation pass.
    """
    if cache_dir is None and known is not None:
        return [list(c) for c in known]
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
        if path not in by_file:
            by_file[path] = json.loads(path.read_text()) if path.is_file() else {}
        if ex.id in by_file[path]:
            result[i] = by_file[path][ex.id]
    missing = [i for i, r in enumerate(result) if r is None]
    if missing:
        fresh = (
            [known[i] for i in missing]
            if known is not None
            else greedy_completions(
                base_model,
                tokenizer,
                [prompts[i] for i in missing],
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
            )
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
        for path in touched:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(by_file[path]))
            tmp.replace(path)  # atomic: a concurrent reader sees the old or the new file, never half
    return [r if r is not None else [] for r in result]


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
) -> dict[str, float]:
    """``{"ppl_ret", "ret_jsd", "ppl_ret_reverse"}`` of ``model`` against ``base_model`` on ``examples``.

    Both models must share ``tokenizer`` (and its vocabulary). ``completions``: the evaluated model's
    greedy completions as token ids, when the caller already has them (saves one generation pass);
    otherwise they are generated here. Prompts whose completion is empty are left out of the means.
    """
    if not examples:
        raise ValueError("retention needs at least one example")
    prompts = [_prompt_ids(tokenizer, ex.messages) for ex in examples]
    if completions is None:
        completions = greedy_completions(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
    if model is base_model:
        # The base model against itself: one scoring pass; its completions are the base completions
        # every later variant's reverse direction needs, so they seed the cache.
        forward = score_completions(base_model, tokenizer, prompts, completions, batch_size=batch_size)
        forward["jsd"] = [torch.zeros(len(t)) for t in forward["token_logprobs"]]
        _cached_base_completions(
            base_model, tokenizer, examples, prompts, max_new_tokens, batch_size, cache_dir, known=completions
        )
        reverse = forward
    else:
        forward = score_completions(
            base_model, tokenizer, prompts, completions, batch_size=batch_size, other_model=model
        )
        base_completions = _cached_base_completions(
            base_model, tokenizer, examples, prompts, max_new_tokens, batch_size, cache_dir
        )
        reverse = score_completions(model, tokenizer, prompts, base_completions, batch_size=batch_size)
    forward_ppl = _per_prompt_ppl(forward["token_logprobs"])
    reverse_ppl = _per_prompt_ppl(reverse["token_logprobs"])
    jsd_tokens = [t for t in forward["jsd"] if t.numel() > 0]
    return {
        "ppl_ret": sum(forward_ppl) / len(forward_ppl) if forward_ppl else float("nan"),
        "ret_jsd": float(torch.cat(jsd_tokens).mean()) if jsd_tokens else float("nan"),
        "ppl_ret_reverse": sum(reverse_ppl) / len(reverse_ppl) if reverse_ppl else float("nan"),
    }
