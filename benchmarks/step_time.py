"""Per-phase step time of SDFT, UniSD* (K=3) and TRL's on-policy DistillationTrainer, measured in one run.

Same model (SmolLM2-135M-Instruct, full fine-tuning, fp32 on CPU), same batch (the same 4 ScienceQA
training prompts at every step), exactly 64 completion tokens per prompt for every method (EOS is held
off with ``min_new_tokens``: otherwise a batch whose samples happen to stop early looks faster), same
sampling temperature; TRL's teacher is a second copy of the same model. UniSD*'s retrieval donors are
the other three prompts. Methods run in interleaved rounds (sdft, unisd_star, trl, sdft, ...) so that load from other
processes on a shared machine hits all of them alike; each run's first ``--warmup`` steps (2: lazy
initialisation, optimizer state, first-touch page faults of the large buffers) are discarded and the
per-phase medians over the remaining steps are reported, then the ratios ``unisd_star / sdft``
(target <= 1.5) and ``sdft / trl`` (target <= 1.0).

Phases: generation (sampling completions), teacher (gradient-free teacher forwards: for UniSD* the
demonstration context plus K=3 agreement contexts plus the negative context, one batched pass), student
(forward with gradient, loss, backward), optimizer (clipping, AdamW, schedule, EMA sync). For TRL the
same split is taken by timing its ``_generate_and_score_completions`` (generation), its teacher
``_get_last_hidden_state`` calls (teacher), the rest of ``training_step`` (student, which for TRL also
holds the teacher's LM head: its chunked loss projects both hidden states) and the rest of the optimizer
step (optimizer).

Note the teachers differ by design: SDFT's teacher reads prompt + gold demonstration + instruction
(~1.3x the tokens of TRL's teacher rows here), TRL's reads the bare prompt (plain distillation has no
demonstration context). TRL's teacher is an identical copy of the student with the same context, so its
loss is exactly 0 at every step.

Measured 2026-11-29 on the idle 2-core CPU box (``--steps 4 --rounds 2 --warmup 2``), median s/step, with
the glibc malloc tuning of :mod:`unisd_components.cpu_memory` on (process-wide, so for TRL too):

    method       generation  teacher  student  optimizer  total
    sdft               4.71     1.15     3.09       0.19   9.16
    unisd_star         4.73     7.02     3.19       0.19  15.17
    trl                4.66     0.95     3.37       0.15   9.12

and without it (the run before the tuning existed): sdft 9.68 (student 3.61), unisd_star 15.75,
trl 9.18 (student 3.41). The tuning takes ~0.5 s off our steps and almost nothing off TRL's, whose chunked
loss allocates fewer vocabulary-sized buffers.

unisd_star / sdft = 1.66 (1.63 without the tuning; target <= 1.5: MISSED). Every phase but one is at parity
(generation 1.00, student 1.03, optimizer 1.00); the teacher phase is 6.1x SDFT's because it scores 5
context rows per prompt instead of 1: ~7,150 tokens against ~1,120 (the K=3 agreement contexts each hold a
donor's problem and solution before the prompt). Both run at the same ~1,100 tokens/s, i.e. at this CPU's
fp32 matmul rate (mm is ~70% of the teacher's profile, attention 12%): the time is the tokens. Tried and
not kept: other chunk budgets (1024 ties 2048; 4096 and 8192 are slower), and computing the shared heads
of the contexts once (system prompt + donor header, prompt shared by the demonstration and negative
contexts): it saves only ~10% of the tokens and the regrouping it needs adds more padding than that (13%
slower).

sdft / trl = 1.004 (1.05 without the tuning; target <= 1.0: at parity, met only to rounding). Generation
is at parity (both use ``generate``; a decode step is bound by reading the 0.54 GB of fp32 weights). Our
student (forward, loss, backward) is now 8% faster than TRL's; the teacher is +0.20 s because its rows
are the demonstration context, ~1.3x TRL's bare-prompt rows (at a better per-token rate than TRL's); the
optimizer is +0.04 s, the check that no weight went non-finite after the update. An earlier session's
figures (1.11 and 1.51, one warm-up step, 2 timed steps) were noise from the second step's page faults;
these replace them.

``--fused-vs-unfused [--methods sdft unisd_star]`` times ``training.fused_loss`` true against false instead
(target: fused no more than 5% slower). UniSD* syncs its EMA every step here (the preset's 10 would
never fire in a 5-step run, which the trainer refuses as inert). Measured 2026-12-01 on the idle 2-core box
(``--fused-vs-unfused --steps 3 --rounds 2 --warmup 2``, full fine-tuning), median s/step:

    method              generation  teacher  student  optimizer  total
    sdft fused                7.94     1.86     4.97       0.32  15.06
    sdft unfused              7.02     1.80     4.77       0.30  14.12
    unisd_star fused          7.01     9.86     4.01       0.37  20.18
    unisd_star unfused        6.35     9.79     4.15       0.38  21.03

fused / unfused, total: sdft 1.067, unisd_star 0.959; the student phase, the only one the setting changes
(the forward, the loss and its backward; the teacher's hidden states are the same either way): sdft 1.04,
unisd_star 0.97. The generation phase, which never sees the loss, moved by 10-13% between the runs of one
round: that is the box's noise, and it is what puts sdft's total over 5%. A second run, SDFT only and three
rounds (``--methods sdft --steps 3 --rounds 3``): fused 14.24 s/step against unfused 14.85, 0.959 (student
0.97, generation 0.98). The logits are not recomputed
here: 256 positions fit one chunk, which the forward keeps for the backward. Generation is slower than in
the 2026-11-29 table above (7-8 s against 4.7 s for 4 x 64 tokens): a decoding step of ``generate`` now
takes ~120 ms at batch 4, in both the fused and unfused runs and with or without the stated decoding rule
(measured side by side); 29% of a decoding step is the KV cache's ``torch.cat``.

Run: ``python benchmarks/step_time.py [--steps 4] [--rounds 2] [--warmup 2] [--model bundled:smollm2-135m-instruct]``
(needs the bench extra: ``pip install trl``). Takes several minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

PHASES = ("generation", "teacher", "student", "optimizer")
COMPLETION_TOKENS = 64


def _examples(tokenizer, n: int, data_dir: str | None):
    from unisd_components import TrainingExample

    try:
        from harness.data import load_benchmark

        raw = load_benchmark("scienceqa", "train", data_dir=data_dir, limit=n)
        return [e.to_training_example() for e in raw]
    except Exception as err:  # no local data: synthetic prompts of similar length
        print(
            f"(scienceqa not available: {err.__class__.__name__}; using synthetic prompts)", file=sys.stderr
        )
        return [
            TrainingExample(
                id=f"synthetic/{i}",
                messages=[
                    {"role": "user", "content": f"Question {i}: which is larger, {i} or {i + 1}? " * 6}
                ],
                demonstration=f"{i + 1} is one more than {i}, so it is larger. The answer is (B).",
                kind="multiple_choice",
                choices=(str(i), str(i + 1)),
                answer="B",
            )
            for i in range(n)
        ]


def run_ours(
    base_model, tokenizer, examples, variant, steps: int, cache_dir: Path, warmup: int = 2, fused: bool = True
) -> list[dict[str, float]]:
    from unisd_components import TrainingConfig, train_variant

    training = TrainingConfig(
        max_steps=steps + warmup,
        batch_size=4,
        max_completion_tokens=COMPLETION_TOKENS,
        temperature=0.7,
        learning_rate=1e-5,
        fused_loss=fused,
    )
    model = copy.deepcopy(base_model)
    model.generation_config.min_new_tokens = COMPLETION_TOKENS  # equal work for every method (see docstring)
    result = train_variant(model, tokenizer, examples, variant, training, cache_dir=cache_dir)
    # "student" is forward + backward here, as in TRL's column (the trainer times them apart).
    return [
        {p: row[f"seconds_{p}"] for p in PHASES}
        | {"student": row["seconds_student"] + row["seconds_backward"], "tokens": row["generated_tokens"]}
        for row in result.history[warmup:]
    ]


def run_trl(
    base_model, tokenizer, examples, steps: int, seed: int = 0, warmup: int = 2
) -> list[dict[str, float]]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    student = copy.deepcopy(base_model).train()
    teacher = copy.deepcopy(base_model).eval()
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "left"
    dataset = Dataset.from_list([{"prompt": [dict(m) for m in ex.messages]} for ex in examples])
    with tempfile.TemporaryDirectory() as out:
        args = DistillationConfig(
            output_dir=out,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=1,
            max_steps=steps + warmup,
            learning_rate=1e-5,
            warmup_steps=0.1,  # a fraction of the steps (transformers 5)
            lr_scheduler_type="cosine",
            max_grad_norm=1.0,
            max_completion_length=COMPLETION_TOKENS,
            temperature=0.7,
            top_k=0,
            top_p=1.0,
            beta=0.0,  # forward KL, as SDFT's default alpha = 0
            generation_kwargs={"min_new_tokens": COMPLETION_TOKENS},
            gradient_checkpointing=False,
            bf16=False,
            use_cpu=not torch.cuda.is_available(),
            report_to="none",
            logging_steps=1,
            save_strategy="no",
            seed=seed,
            disable_tqdm=True,
        )
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tok
        )
        timings: list[dict[str, float]] = []
        current: dict[str, float] = defaultdict(float)

        def timed(fn, key, only_no_grad=False):
            def wrapper(*a, **k):
                if only_no_grad and torch.is_grad_enabled():
                    return fn(*a, **k)
                start = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    current[key] += time.perf_counter() - start

            return wrapper

        trainer._generate_and_score_completions = timed(trainer._generate_and_score_completions, "generation")
        trainer._get_last_hidden_state = timed(trainer._get_last_hidden_state, "teacher", only_no_grad=True)
        trainer.training_step = timed(trainer.training_step, "training_step")

        class StepTimer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                current.clear()
                current["_start"] = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                total = time.perf_counter() - current["_start"]
                # training_step includes generation (in _prepare_inputs) and the teacher pass.
                student = current["training_step"] - current["generation"] - current["teacher"]
                timings.append(
                    {
                        "generation": current["generation"],
                        "teacher": current["teacher"],
                        "student": student,
                        "optimizer": total - current["training_step"],
                        "tokens": float("nan"),
                    }
                )

        trainer.add_callback(StepTimer())
        trainer.train()
    return timings[warmup:]


def _median(rows: list[dict[str, float]]) -> dict[str, float]:
    out = {p: statistics.median(r[p] for r in rows) for p in PHASES}
    out["total"] = statistics.median(sum(r[p] for p in PHASES) for r in rows)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed first steps per run (lazy initialisation, optimizer state, first-touch page faults)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the three methods")
    parser.add_argument("--examples", type=int, default=4, help="4 = every step scores the same batch")
    parser.add_argument("--data-dir", default=os.environ.get("UNISD_DATA_DIR"))
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument(
        "--fused-vs-unfused",
        action="store_true",
        help="compare training.fused_loss true against false (SDFT and UniSD*, interleaved; no TRL)",
    )
    parser.add_argument(
        "--methods", nargs="+", default=["sdft", "unisd_star"], help="with --fused-vs-unfused: which methods"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for every method (default: torch's choice)",
    )
    args = parser.parse_args(argv)
    from unisd_components.cpu_memory import keep_freed_memory

    # Process-wide, so TRL gets it too; as the harness runs its trials (see the module's docstring).
    print(f"glibc malloc tuning: {'on' if keep_freed_memory() else 'off'}", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)

    from harness.models import load_model
    from unisd_components import PRESETS, VariantConfig

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    examples = _examples(tokenizer, args.examples, args.data_dir)
    # The preset syncs its EMA teacher every 10 steps; these runs are a few steps long, so it syncs every
    # step (the sync's cost lands in every timed step, and the run is not refused as inert).
    star = PRESETS["unisd_star"]
    star = star.model_copy(update={"ema": star.ema.model_copy(update={"sync_steps": 1})})
    variants = {"sdft": VariantConfig(), "unisd_star": star}
    print(
        f"model {args.model} on {next(model.parameters()).device}, {torch.get_num_threads()} threads; "
        f"batch 4, 64 completion tokens, {args.warmup} warm-up + {args.steps} timed steps x {args.rounds} rounds",
        flush=True,
    )
    rows: dict[str, list[dict[str, float]]] = defaultdict(list)
    if args.fused_vs_unfused:
        return _fused_vs_unfused(model, tokenizer, examples, variants, args)
    with tempfile.TemporaryDirectory(prefix="unisd-bench-") as tmp:
        cache = Path(tmp)
        # Generate the negatives and embeddings once, outside the timed runs (a study caches them too).
        run_ours(model, tokenizer, examples, variants["unisd_star"], 0, cache, warmup=1)
        for round_ in range(args.rounds):
            for name, variant in variants.items():
                rows[name] += run_ours(model, tokenizer, examples, variant, args.steps, cache, args.warmup)
                print(
                    f"round {round_ + 1}: {name} {_median(rows[name])['total']:.2f} s/step so far", flush=True
                )
            if not args.skip_trl:
                rows["trl"] += run_trl(model, tokenizer, examples, args.steps, warmup=args.warmup)
                print(
                    f"round {round_ + 1}: trl {_median(rows['trl'])['total']:.2f} s/step so far", flush=True
                )

    medians = {name: _median(r) for name, r in rows.items()}
    print("\nmedian seconds per optimizer step")
    print(f"{'method':<12}" + "".join(f"{p:>12}" for p in (*PHASES, "total")))
    for name, m in medians.items():
        print(f"{name:<12}" + "".join(f"{m[p]:>12.2f}" for p in (*PHASES, "total")))
    ratio_star = medians["unisd_star"]["total"] / medians["sdft"]["total"]
    print(f"\nunisd_star / sdft = {ratio_star:.2f}  (target <= 1.5)")
    print(
        "  per phase: "
        + ", ".join(f"{p} {medians['unisd_star'][p] / max(medians['sdft'][p], 1e-9):.2f}" for p in PHASES)
    )
    if "trl" in medians:
        ratio_trl = medians["sdft"]["total"] / medians["trl"]["total"]
        print(f"sdft / trl = {ratio_trl:.2f}  (target <= 1.0)")
        print(
            "  per phase: "
            + ", ".join(f"{p} {medians['sdft'][p] / max(medians['trl'][p], 1e-9):.2f}" for p in PHASES)
        )
    return 0


def _fused_vs_unfused(model, tokenizer, examples, variants, args) -> int:
    """``training.fused_loss`` on against off, per method, in interleaved rounds (fused, unfused, ...)."""
    rows: dict[tuple[str, bool], list[dict[str, float]]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="unisd-bench-") as tmp:
        cache = Path(tmp)
        if "unisd_star" in args.methods:
            run_ours(model, tokenizer, examples, variants["unisd_star"], 0, cache, warmup=1)
        variants = {name: variants[name] for name in args.methods}
        for round_ in range(args.rounds):
            for name, variant in variants.items():
                # Alternate which goes first, so a drift in machine load does not favour one side.
                for fused in (True, False) if round_ % 2 == 0 else (False, True):
                    rows[name, fused] += run_ours(
                        model, tokenizer, examples, variant, args.steps, cache, args.warmup, fused=fused
                    )
                    label = "fused" if fused else "unfused"
                    print(
                        f"round {round_ + 1}: {name} {label} {_median(rows[name, fused])['total']:.2f} s/step so far",
                        flush=True,
                    )
    print("\nmedian seconds per optimizer step")
    print(f"{'method':<22}" + "".join(f"{p:>12}" for p in (*PHASES, "total")))
    medians = {key: _median(r) for key, r in rows.items()}
    for (name, fused), m in medians.items():
        label = f"{name} {'fused' if fused else 'unfused'}"
        print(f"{label:<22}" + "".join(f"{m[p]:>12.2f}" for p in (*PHASES, "total")))
    for name in variants:
        fused, unfused = medians[name, True], medians[name, False]
        print(
            f"{name}: fused / unfused = {fused['total'] / unfused['total']:.3f} (target <= 1.05); per phase: "
            + ", ".join(f"{p} {fused[p] / max(unfused[p], 1e-9):.2f}" for p in PHASES)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
