"""Seconds of an evaluation and of training steps with the rows' common prefix run once, against every row
running it (ratios, one run).

:func:`unisd_components.prefill.prefix_kv` (every prefill: the student's prompt pass, sampling, the
evaluation's generation, setup generations, teacher contexts) and ``StepRunner._row_hidden`` (SFT's
student, unshared teacher contexts) run the tokens all rows begin with once (the chat template's system
turn: 24 tokens for SmolLM2), then each row's rest after their KV. The model and settings are the
quickstart's (``studies/quickstart.yaml``: SmolLM2-135M-Instruct with LoRA, fp32 on CPU):

- ``eval``: the base model's evaluation on the quickstart's 36 questions (generation and scoring; no
  retention);
- ``train``: ``--steps`` training steps of ``--variant`` (default SDFT), a fresh LoRA model each time.

**baseline** is the same work with the common prefix switched off (``common_prefix_length`` answers 0);
**ours** is the code as it is. They alternate (baseline, ours, baseline, ...) so that load from other
processes hits both alike; a first evaluation and a first training run warm the process up (a frozen
teacher's contexts are then kept for both sides alike). The malloc tuning the harness applies is applied
here too. Run::

    python benchmarks/common_prefix.py --rounds 2

Figures, measured 2026-12-02 on the 2-core box (``--rounds 2``, SDFT, 2 steps; seconds per round):

    workload    baseline        ours
    eval        18.2, 18.0      16.5, 16.1      (x1.11)
    train       30.8            27.6            (x1.12; student 9.4 -> 8.7 s, backward 11.8 -> 10.1 s)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variant", default="sdft")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from harness.data.training import load_train_examples
    from harness.evaluation.lmeval import evaluate_model
    from harness.models import load_model, with_spec_lora
    from harness.plan import grid_points, point_training, point_variant
    from harness.spec import load_spec
    from unisd_components import prefill
    from unisd_components.cpu_memory import keep_freed_memory
    from unisd_components.trainer import train_variant

    keep_freed_memory()
    spec = load_spec(Path(__file__).resolve().parent.parent / "studies" / "quickstart.yaml")
    base, tok = load_model(spec.model.ref)
    base.eval()
    real = prefill.common_prefix_length

    def switch(on: bool) -> None:
        answer = real if on else (lambda sequences: 0)
        prefill.common_prefix_length = answer  # what common_prefix_worth_sharing asks, for both callers

    ev = spec.evaluation

    def evaluation() -> float:
        start = time.perf_counter()
        evaluate_model(
            base, tok, ev.benchmarks, limit=ev.limit, batch_size=ev.batch_size, output_dir=Path(tempfile.mkdtemp()),
            data_dir=spec.data.data_dir, max_gen_tokens=ev.max_gen_tokens, ppl_fit=False, retention=False,
        )  # fmt: skip
        return time.perf_counter() - start

    point = next(
        p for p in grid_points(spec) if point_variant(p) is not None and point_variant(p).name.startswith(args.variant)
    )
    training = point_training(point, spec).model_copy(update={"max_steps": args.steps})
    examples = load_train_examples(spec.data)

    def training_run() -> float:
        torch.manual_seed(0)
        model = with_spec_lora(copy.deepcopy(base), spec.model.lora)
        start = time.perf_counter()
        train_variant(model, tok, examples, point_variant(point), training, cache_dir=Path(tempfile.mkdtemp()))
        return time.perf_counter() - start

    evaluation(), training_run()  # warm-up
    print(f"{'workload':10s}  {'baseline/ours':>13s}  seconds (median baseline/ours)")
    for name, run in (("eval", evaluation), ("train", training_run)):
        pairs = []
        for _ in range(args.rounds):
            switch(False)
            baseline = run()
            switch(True)
            pairs.append((baseline, run()))
        ratio = statistics.median(b / o for b, o in pairs)
        base_s, ours_s = statistics.median(b for b, _ in pairs), statistics.median(o for _, o in pairs)
        print(f"{name:10s}  {f'x{ratio:.2f}':>13s}  {base_s:.1f}/{ours_s:.1f}")


if __name__ == "__main__":
    main()
