"""Peak memory of one optimizer step, fused against unfused loss (``training.fused_loss``), in one run.

A 2-layer random Llama with Qwen2.5's vocabulary (151,936 entries, hidden 128, tied embeddings), so that
the loss, not the model, dominates; batch 4; exactly T = 256, 512, 1024 completion tokens per prompt
(EOS held off with ``min_new_tokens``); SDFT and UniSD* (the ``unisd_star`` preset: retrieval K = 3,
contrastive, EMA, feature matching). Each configuration runs in a fresh subprocess. Measured: the first
optimizer step (generation, teacher, student, backward, AdamW with its state allocation), from the
moment the step starts (model loaded, components set up: negatives generated, embeddings computed):

- CPU: peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs`` at the step's start)
  minus the resident size at that moment, glibc's default malloc (no ``keep_freed_memory``);
- CUDA: ``torch.cuda.max_memory_allocated`` (reset at the step's start) minus the allocated memory then.

By default the completions are random token ids (exactly T, no EOS) instead of samples, and the
contrastive negatives a fixed wrong text, because on a shared CPU box ``generate`` over a 152k vocabulary
takes most of a step's time (18 minutes for one SDFT step at T = 256 under that load) while its memory
(the KV cache of a 2-layer model, one ``[4, V]`` logits row per decoding step) is negligible beside the
loss's; ``--sample`` samples for real. The numbers of tokens scored are the same either way.

"tensors" = growth / one ``[4, T, V]`` fp32 tensor. Unfused configurations whose estimated growth
(measured growth per tensor at the largest T run so far, times the tensor at this T) exceeds
``--max-gb`` are skipped with the reason printed (the machine this ran on is shared).

Measured 2026-12-01 on the shared 2-core, 24 GB CPU box (``python benchmarks/step_memory.py``), growth
in MB (tensors):

    method      T     one tensor   fused          unfused          fused/unfused
    sdft        256      594        382 (0.64)     3,170 (5.34)     0.12
    sdft        512    1,187        413 (0.35)     6,314 (5.32)     0.065
    sdft       1024    2,374        557 (0.23)     not run (~13 GB at 5.4 tensors)
    unisd_star  256      594        356 (0.60)     not run (time)
    unisd_star  512    1,187        500 (0.42)     not run (time)
    unisd_star 1024    2,374        578 (0.24)     not run

The load average was 20-40 on the 2 cores during this run (other sessions' tests), so a step took 4 to
18 minutes and the run could not be completed in the session: the fused rows ran three at a time
(``--jobs 3``), the unfused rows as single ``--child`` runs; "not run" rows were never measured. The
unfused SDFT figures match the issue's (3,210 and 6,330 MB, 5.4 tensors). Checks: SDFT at T=512 grows
413 MB, a third of one [4,T,V] tensor (target: at most one, 1,187 MB; 6.3 GB before); UniSD*/SDFT
(fused) 0.93 at T=256, 1.21 at T=512 and 1.04 at T=1024 (target <= 1.3); T=512 -> 1024: +144 MB, +35% (target < 30%:
MISSED in relative terms, on a small base: the rise is 6% of one [4,1024,V] tensor, and it is the
model's, not the loss's: the eager attention of the 2-layer model keeps [B, heads, L, L] probabilities
per layer for the backward, L = prompt + T, ~+100 MB from L ~ 600 to ~ 1100). Fused growth is mostly
the AdamW state and gradient of the 19M-parameter model (~230 MB) plus a few 64 MiB chunks; RSS figures
carry glibc's allocation granularity (tens of MB).

Re-measured 2026-12-01 on the idle box, fused only (``--lengths 512 1024 --fused-only``, then the same with
``--gradient-checkpointing``), growth in MB (tensors); UniSD* syncs its EMA at the one step (the preset's
period of 10 is refused as inert):

    method      T     checkpointing off   checkpointing on
    sdft        512        488 (0.41)          455 (0.38)
    sdft       1024        632 (0.27)          533 (0.22)
    unisd_star  512        491 (0.41)          511 (0.43)
    unisd_star 1024        562 (0.24)          534 (0.22)

SDFT's rise from T=512 to 1024: +29.6% without checkpointing (+35% in the loaded run above: RSS moves by
tens of MB between runs), +17.2% with it (target < 30%). With the layers' activations recomputed in the
backward, what still grows is the per-layer inputs ([B, L, H]) and the loss's [B, T] values, not
[B, T, V]: the fused loss keeps one chunk of logits whatever T. UniSD*/SDFT: 1.01 and 0.89 without
checkpointing, 1.12 and 1.00 with it (target <= 1.3). SDFT at T=512 stays at 0.4 of one [4,T,V] tensor.

Run: ``python benchmarks/step_memory.py [--lengths 256 512 1024] [--methods sdft unisd_star]
[--max-gb 8] [--device cpu|cuda]``. Several minutes; the unfused runs need several GB of RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB = 151_936
HIDDEN = 128
BATCH = 4
MB = 1024 * 1024
UNFUSED_PRIOR_TENSORS = (
    5.5  # the measurement: an unfused step peaks ~5.4 [4,T,V] tensors above the model
)


def tensor_mb(T: int) -> float:
    """One ``[BATCH, T, VOCAB]`` fp32 tensor, in MB."""
    return BATCH * T * VOCAB * 4 / MB


def _meminfo_kb(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/meminfo")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _examples(n: int):
    from unisd_components import TrainingExample

    return [
        TrainingExample(
            id=f"synthetic/{i}",
            messages=[{"role": "user", "content": f"Question {i}: which is larger, {i} or {i + 1}? " * 6}],
            demonstration=f"{i + 1} is one more than {i}, so it is larger. The answer is (B).",
            kind="multiple_choice",
            choices=(str(i), str(i + 1)),
            answer="B",
        )
        for i in range(n)
    ]


def _random_completions(model, prompts, *, max_new_tokens, eos_ids, **_):
    """Stand-in for sampling: ``max_new_tokens`` random non-EOS ids per prompt (see the module docstring)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (len(prompts), max_new_tokens), generator=gen)
    ids[torch.isin(ids, torch.tensor(list(eos_ids)))] = 7
    return ids.to(next(model.parameters()).device)


def child(
    method: str, T: int, fused: bool, device: str, sample: bool = False, checkpointing: bool = False
) -> dict:
    """One configuration, one optimizer step: the peak growth in MB (run in its own process)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness.models import TINY_RANDOM_LLAMA, load_tokenizer
    from unisd_components import PRESETS, TrainingConfig, VariantConfig, train_variant
    from unisd_components import step as step_module

    cuda = device.startswith("cuda")
    if not fused and not cuda:
        # Never push a shared machine into the OOM killer (it may pick another user's process).
        need = UNFUSED_PRIOR_TENSORS * tensor_mb(T)
        available = _meminfo_kb("MemAvailable") / 1024
        if need > 0.8 * available:
            reason = f"needs ~{need:.0f} MB ({UNFUSED_PRIOR_TENSORS} tensors), {available:.0f} MB available"
            skipped = {"method": method, "T": T, "fused": fused, "growth_mb": float("nan"), "skipped": reason}
            nan = float("nan")  # the fields a finished run has, so that any caller can print it
            return {**skipped, "baseline_mb": nan, "seconds": nan, "completion_tokens": nan}
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).to(device)
    tokenizer = load_tokenizer(TINY_RANDOM_LLAMA)
    model.generation_config.min_new_tokens = T
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    variant = VariantConfig() if method == "sdft" else PRESETS[method]
    if variant.ema is not None:  # one step: the preset's period (10) is refused as inert; sync at step 1
        variant = variant.model_copy(update={"ema": variant.ema.model_copy(update={"sync_steps": 1})})
    training = TrainingConfig(
        max_steps=1,
        batch_size=BATCH,
        max_completion_tokens=T,
        learning_rate=1e-5,
        warmup_ratio=0.0,
        fused_loss=fused,
        gradient_checkpointing=checkpointing,
    )
    state: dict[str, float] = {}
    real_distill = step_module.StepRunner.distill

    def measured_distill(self, *args, **kwargs):
        if "baseline" not in state:  # the step starts here: everything before is the loaded model + setup
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                state["baseline"] = torch.cuda.memory_allocated() / MB
            else:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                state["baseline"] = _status_kb("VmRSS") / 1024
            state["start"] = time.perf_counter()
        return real_distill(self, *args, **kwargs)

    def after_step(step: int, row: dict) -> None:
        if cuda:
            torch.cuda.synchronize()
            state["peak"] = torch.cuda.max_memory_allocated() / MB
        else:
            state["peak"] = _status_kb("VmHWM") / 1024
        state["seconds"] = time.perf_counter() - state["start"]
        state["completion_tokens"] = row["completion_tokens"]

    step_module.StepRunner.distill = measured_distill
    if not sample:
        from unisd_components import generation

        step_module.sample_completions = _random_completions
        generation.generate_texts = lambda model, tok, prompts, *a, **k: [
            "A wrong argument for a wrong option, written out at some length. " * 8 for _ in prompts
        ]
    with tempfile.TemporaryDirectory(prefix="unisd-stepmem-") as tmp:
        train_variant(
            model, tokenizer, _examples(BATCH), variant, training, cache_dir=Path(tmp), callback=after_step
        )
    return {
        "method": method,
        "T": T,
        "fused": fused,
        "growth_mb": state["peak"] - state["baseline"],
        "baseline_mb": state["baseline"],
        "seconds": state["seconds"],
        "completion_tokens": state["completion_tokens"],
    }


def _cell(r: dict | None, T: int) -> str:
    return f"{r['growth_mb']:.0f} ({r['growth_mb'] / tensor_mb(T):.2f})" if r else "skipped"


def _run_child(method: str, T: int, fused: bool, device: str, sample: bool, checkpointing: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(T), "1" if fused else "0", "--device", device]
    cmd += ["--sample"] if sample else []
    cmd += ["--gradient-checkpointing"] if checkpointing else []
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if out.returncode != 0:
        raise RuntimeError(f"{method} T={T} fused={fused} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--methods", nargs="+", default=["sdft", "unisd_star"])
    parser.add_argument("--max-gb", type=float, default=8.0, help="skip unfused runs estimated above this")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="fused configurations run this many at a time (each in its process)",
    )
    parser.add_argument(
        "--sample",
        action="store_true",
        help="really sample the completions and negatives (default: random tokens; see the docstring)",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="training.gradient_checkpointing: the layers' activations are recomputed in the backward, so "
        "what still grows with T is the loss's (and the per-layer inputs, [B, L, H])",
    )
    parser.add_argument(
        "--fused-only", action="store_true", help="skip the unfused reference runs (GBs of RAM, minutes)"
    )
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "T", "FUSED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        method, T, fused = args.child
        print(
            json.dumps(
                child(method, int(T), fused == "1", args.device, args.sample, args.gradient_checkpointing)
            ),
            flush=True,
        )
        return 0

    lengths = sorted(args.lengths)
    results: dict[tuple[str, int, bool], dict] = {}
    skipped: dict[tuple[str, int, bool], str] = {}
    print(
        f"vocab {VOCAB}, hidden {HIDDEN}, batch {BATCH}, device {args.device}, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}",
        flush=True,
    )
    if args.jobs > 1:  # the fused runs are small: several at a time (peaks are per process)
        from concurrent.futures import ThreadPoolExecutor

        keys = [(m, T, True) for T in lengths for m in args.methods]
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {
                k: pool.submit(_run_child, *k, args.device, args.sample, args.gradient_checkpointing)
                for k in keys
            }
            for key, future in futures.items():
                results[key] = r = future.result()
                print(
                    f"{key[0]:<11} T={key[1]:<5} fused   growth {r['growth_mb']:8.0f} MB "
                    f"({r['growth_mb'] / tensor_mb(key[1]):.2f} tensors), {r['seconds']:.1f} s",
                    flush=True,
                )
    # Fused first (small), then unfused by increasing T: the largest, riskiest runs come last.
    for fused in (True,) if args.fused_only else (True, False):
        for T in lengths:
            for method in args.methods:
                key = (method, T, fused)
                if key in results:
                    continue
                done = [r for (m, t, f), r in results.items() if m == method and f == fused]
                if not fused and done:
                    last = max(done, key=lambda r: r["T"])
                    estimate = last["growth_mb"] / tensor_mb(last["T"]) * tensor_mb(T) / 1024
                    if estimate > args.max_gb:
                        skipped[key] = (
                            f"estimated {estimate:.1f} GB (measured {last['growth_mb'] / tensor_mb(last['T']):.1f} "
                            f"tensors at T={last['T']}) > --max-gb {args.max_gb:g}"
                        )
                        print(f"skip {method} T={T} unfused: {skipped[key]}", flush=True)
                        continue
                r = _run_child(method, T, fused, args.device, args.sample, args.gradient_checkpointing)
                if r.get("skipped"):
                    skipped[key] = r["skipped"]
                    print(
                        f"skip {method} T={T} {'fused' if fused else 'unfused'}: {r['skipped']}", flush=True
                    )
                    continue
                results[key] = r
                print(
                    f"{method:<11} T={T:<5} {'fused  ' if fused else 'unfused'} growth {r['growth_mb']:8.0f} MB "
                    f"({r['growth_mb'] / tensor_mb(T):.2f} tensors), {r['seconds']:.1f} s",
                    flush=True,
                )

    print("\npeak growth of one optimizer step, MB (in [4,T,V] fp32 tensors)")
    print(f"{'method':<11} {'T':>5} {'tensor':>8} {'fused':>16} {'unfused':>16} {'fused/unfused':>14}")
    for method in args.methods:
        for T in lengths:
            f, u = results.get((method, T, True)), results.get((method, T, False))

            ratio = f"{f['growth_mb'] / u['growth_mb']:.3f}" if f and u else "-"
            print(f"{method:<11} {T:>5} {tensor_mb(T):>8.0f} {_cell(f, T):>16} {_cell(u, T):>16} {ratio:>14}")
    for key, reason in skipped.items():
        print(f"skipped {key[0]} T={key[1]} unfused: {reason}")

    def growth(method, T):
        r = results.get((method, T, True))
        return None if r is None else r["growth_mb"]

    print("\nchecks (fused):")
    if growth("sdft", 512) is not None:
        g = growth("sdft", 512)
        print(f"  sdft T=512 growth {g:.0f} MB <= one tensor {tensor_mb(512):.0f} MB: {g <= tensor_mb(512)}")
    if growth("sdft", 512) and growth("sdft", 1024):
        rise = growth("sdft", 1024) / growth("sdft", 512) - 1
        print(f"  sdft growth rises {rise:+.1%} from T=512 to T=1024 (target < +30%): {rise < 0.3}")
    for T in lengths:
        if growth("sdft", T) and growth("unisd_star", T):
            ratio = growth("unisd_star", T) / growth("sdft", T)
            print(f"  unisd_star / sdft at T={T}: {ratio:.2f} (target <= 1.3): {ratio <= 1.3}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
