"""Seconds of training steps with the shared passes against the same steps without them (ratios, one run).

The training step runs work once that it used to run twice (:mod:`unisd_components.step`): the student's
prompt pass also serves its sampling, and teacher contexts that share a long prefix (UniSD*'s main and
negative contexts, agreement contexts with the same donor) run that prefix once. This benchmark trains
the quickstart's SDFT and UniSD* variants (``studies/quickstart.yaml``: SmolLM2-135M-Instruct with LoRA,
batch 16, 24 sampled tokens, fp32 on CPU) for ``--steps`` optimizer steps each way:

- **baseline**: no shared pass (the student's prompts prefilled again for sampling; every teacher context
  run whole), as the trainer was before 2026-12-02;
- **ours**: the trainer as it is.

The two alternate (baseline, ours, baseline, ...) so that load from other processes hits both alike; each
round's ratio baseline/ours is printed, and the median over rounds. The malloc tuning the harness applies
(:mod:`unisd_components.cpu_memory`) is applied here too. Run::

    python benchmarks/shared_passes.py --rounds 2 --steps 2

Figures, measured 2026-12-02 on the 2-core box (``--rounds 1 --steps 2`` for UniSD*, 4 steps for SDFT,
old tree against new; per phase: generation, teacher, student, backward seconds):

    variant     baseline/ours   seconds baseline/ours   phases baseline -> ours
    sdft        x1.34           91.4/68.4               gen 27.1 -> 12.5, teacher 23.2 -> 18.9
    unisd_star  x1.34           100.9/75.2              gen 12.3 -> 7.0, teacher 65.1 -> 46.2

Losses and gradients are those of the unshared computation (tests/test_shared_passes.py, float64).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path


def _train(variant_prefix: str, steps: int, shared: bool, cache_dir: Path) -> float:
    import torch

    from harness.data.training import load_train_examples
    from harness.models import load_model, with_spec_lora
    from harness.plan import grid_points, point_training, point_variant
    from harness.spec import load_spec
    from unisd_components import step
    from unisd_components.trainer import train_variant

    spec = load_spec(Path(__file__).resolve().parent.parent / "studies" / "quickstart.yaml")
    point = next(
        p for p in grid_points(spec) if point_variant(p) is not None and point_variant(p).name.startswith(variant_prefix)
    )
    training = point_training(point, spec).model_copy(update={"max_steps": steps})
    examples = load_train_examples(spec.data)
    base, tok = load_model(spec.model.ref)
    torch.manual_seed(0)
    model = with_spec_lora(copy.deepcopy(base), spec.model.lora)
    saved = step.StepRunner._prompt_kv, step._MIN_SHARED_PREFIX
    if not shared:
        step.StepRunner._prompt_kv = lambda self, prompts: None
        step._MIN_SHARED_PREFIX = 10**9
    try:
        start = time.perf_counter()
        result = train_variant(model, tok, examples, point_variant(point), training, cache_dir=cache_dir)
        seconds = time.perf_counter() - start - result.phase_seconds.get("setup", 0.0)
    finally:
        step.StepRunner._prompt_kv, step._MIN_SHARED_PREFIX = saved
    phases = {k: round(v, 1) for k, v in result.phase_seconds.items() if k != "setup"}
    print(f"  {'ours' if shared else 'baseline':8s} {seconds:6.1f} s  {phases}", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from unisd_components.cpu_memory import keep_freed_memory

    keep_freed_memory()
    cache_dir = Path(tempfile.mkdtemp(prefix="shared-passes-"))  # negatives and embeddings: built once
    for label, prefix in (("sdft", "sdft"), ("unisd_star", "unisd[agreement")):
        ratios = []
        print(f"{label} ({args.steps} steps, setup excluded)")
        for _ in range(args.rounds):
            baseline = _train(prefix, args.steps, False, cache_dir)
            ours = _train(prefix, args.steps, True, cache_dir)
            ratios.append(baseline / ours)
            print(f"  round: baseline/ours x{baseline / ours:.2f}")
        print(f"{label}: baseline/ours x{statistics.median(ratios):.2f} (median of {args.rounds})")


if __name__ == "__main__":
    main()
