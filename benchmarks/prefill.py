"""Seconds of the project's generation against plain ``generate`` on the same prompts (ratios, one run).

Two phases, as a quickstart trial runs them, on the bundled SmolLM2-135M-Instruct (fp32, CPU):

- **training sampling**: ``--batch`` training prompts of ScienceQA + MBPP (chat template, 95-266 tokens),
  ``--sample-tokens`` new tokens at T = 0.7 from a LoRA student (r = 16, seven projections, B != 0).
  Baseline: ``generate`` on the left-padded batch with the adapter unmerged (the trainer before
  2026-12-01 evening). Ours: :func:`unisd_components.step.sample_completions` (prompts prefilled in length
  groups, a cache that grows in place, the adapter folded into the weights).
- **evaluation generation**: ``--eval-prompts`` test prompts of ScienceQA, GPQA and MBPP, greedy,
  ``--eval-tokens`` new tokens. Baseline: ``generate`` per task in batches of 12 on left-padded prompts
  (lm-eval's ``HFLM`` groups requests by task). Ours: one
  :func:`unisd_components.prefill.generate_bucketed` call over all prompts
  (:class:`harness.evaluation.hf_lm.BucketedHFLM`'s way).

Baseline and ours alternate (baseline, ours, baseline, ...) so that load from other processes hits both
alike; each round's ratio baseline/ours is printed and the median over rounds. Run::

    python benchmarks/prefill.py --rounds 3

Figures, measured 2026-12-01 on the 2-core box (``python benchmarks/prefill.py --rounds 3``; 16 training
prompts x 24 sampled tokens; 36 test prompts x 48 greedy tokens, no early stop):

    phase               baseline/ours (median)   per round, seconds baseline/ours
    training sampling   x1.62                    9.2/7.4, 12.0/7.4, 11.8/6.3
    evaluation          x1.75                    23.6/13.5, 32.1/15.2, 22.3/17.2

GPU: no GPU was lent to this task; on one, ``generate_bucketed`` groups far fewer prompts (a forward's
fixed cost is worth ~2k tokens of padding there) and the folded adapter applies only to fp32 weights.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time


def _setup(n_train: int, n_eval: int):
    """The base model, a LoRA student with B != 0, the tokenizer, training and per-task test prompts."""
    import torch
    from generation import _prompts  # the training prompts exactly as benchmarks/generation.py takes them

    from harness.data import load_benchmark
    from unisd_components.chat import encode_prompt
    from unisd_components.lora import apply_lora

    model, tok, train, _ = _prompts(n_train, 2)
    evaluation: dict[str, list[list[int]]] = {}
    for bench in ("scienceqa", "gpqa", "mbpp"):
        rows = load_benchmark(bench, "test", data_dir=os.environ.get("UNISD_DATA_DIR"), limit=max(1, n_eval // 3), seed=0)
        evaluation[bench] = [encode_prompt(tok, ex.to_training_example().messages, 512) for ex in rows]
    student = apply_lora(copy.deepcopy(model), r=16, alpha=32)
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    return model.eval(), student.eval(), tok, train, evaluation


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sample-tokens", type=int, default=24)
    parser.add_argument("--eval-prompts", type=int, default=36)
    parser.add_argument("--eval-tokens", type=int, default=48)
    args = parser.parse_args()

    import torch

    from unisd_components.generation import greedy_kwargs, sampling_kwargs
    from unisd_components.prefill import generate_bucketed
    from unisd_components.scoring import pad_left
    from unisd_components.step import sample_completions

    base, student, tok, train, evaluation = _setup(args.batch, args.eval_prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    never = [len(tok)]  # no row stops early: both sides generate every token

    def sampling_baseline():
        ids, mask = pad_left(train, pad)
        with torch.no_grad():
            student.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=args.sample_tokens, pad_token_id=pad,
                eos_token_id=never, use_cache=True, **sampling_kwargs(0.7),
            )  # fmt: skip

    def sampling_ours():
        sample_completions(
            student, train, max_new_tokens=args.sample_tokens, temperature=0.7, pad_id=pad, eos_ids=never
        )

    def eval_baseline():
        with torch.no_grad():
            for rows in evaluation.values():
                for start in range(0, len(rows), 12):
                    ids, mask = pad_left(rows[start : start + 12], pad)
                    base.generate(
                        input_ids=ids, attention_mask=mask, max_new_tokens=args.eval_tokens, pad_token_id=pad,
                        eos_token_id=never, **greedy_kwargs(),
                    )  # fmt: skip

    def eval_ours():
        rows = [row for rows in evaluation.values() for row in rows]
        generate_bucketed(
            base, rows, pad_id=pad, max_new_tokens=args.eval_tokens, eos_token_id=never, **greedy_kwargs()
        )

    phases = {"training sampling": (sampling_baseline, sampling_ours), "evaluation": (eval_baseline, eval_ours)}
    print(f"SmolLM2-135M-Instruct fp32, {torch.get_num_threads()} threads, {args.rounds} rounds")
    for phase, (baseline, ours) in phases.items():
        ratios, pairs = [], []
        for _ in range(args.rounds):
            torch.manual_seed(0)
            a = _timed(baseline)
            torch.manual_seed(0)
            b = _timed(ours)
            ratios.append(a / b)
            pairs.append(f"{a:.1f}/{b:.1f}")
        print(
            f"{phase:18s} baseline/ours median x{statistics.median(ratios):.2f}  "
            f"(per round, seconds baseline/ours: {', '.join(pairs)})"
        )


if __name__ == "__main__":
    main()
