"""Seconds of LoRA forwards (and backwards) with the fused update against peft's own forward (ratios, one run).

:func:`unisd_components.lora.apply_lora` gives each adapted projection a forward that adds the LoRA
update inside one matmul (``addmm_(W x, A x, (s B)^T)``) instead of peft's three passes over the output
(write ``B A x``, scale it, add it). The model is the quickstart's (``studies/quickstart.yaml``:
SmolLM2-135M-Instruct, LoRA r = 16 on all seven projections, fp32 on CPU; B is drawn at random so the
update is not zero). Workloads:

- ``train``: a training forward and backward of 16 rows x 128 tokens (the student's pass);
- ``forward``: the same batch under ``torch.no_grad`` (an unfolded teacher or scoring pass);
- ``decode``: 16 rows decoding 24 tokens after a 128-token prompt (on-policy sampling).

**baseline** is the same model with peft's ``Linear`` forward; **ours** is the fused one. They alternate
(baseline, ours, baseline, ...) so that load from other processes hits both alike; the median ratio
baseline/ours over rounds is printed. The malloc tuning the harness applies is applied here too. Run::

    python benchmarks/lora_forward.py --rounds 3

Figures, measured 2026-12-02 on the 2-core box (``--rounds 3``; median seconds baseline/ours):

    workload    baseline/ours   seconds
    train       x1.13           7.14/6.36
    forward     x0.99           2.49/2.52
    decode      x1.09           3.14/3.07

The training pass is where the three passes cost: the backward scales the output's gradient again.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path


def _models():
    import torch
    from peft.tuners.lora.layer import Linear

    from harness.models import load_model, with_spec_lora
    from harness.spec import load_spec
    from unisd_components.lora import lora_layers

    spec = load_spec(Path(__file__).resolve().parent.parent / "studies" / "quickstart.yaml")
    base, _ = load_model(spec.model.ref)
    torch.manual_seed(0)
    ours = with_spec_lora(copy.deepcopy(base), spec.model.lora)
    for layer in lora_layers(ours).values():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    baseline = copy.deepcopy(ours)
    for layer in lora_layers(baseline).values():
        layer.__class__ = Linear  # peft's own forward
    return baseline, ours


def _train(model, ids) -> float:
    model.train()
    start = time.perf_counter()
    model(input_ids=ids).logits[:, -8:].float().pow(2).mean().backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def _forward(model, ids) -> float:
    import torch

    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, logits_to_keep=1)
    return time.perf_counter() - start


def _decode(model, ids) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(24):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from unisd_components.cpu_memory import keep_freed_memory

    keep_freed_memory()
    baseline, ours = _models()
    ids = torch.randint(100, 20000, (16, 128), generator=torch.Generator().manual_seed(0))
    workloads = {"train": _train, "forward": _forward, "decode": _decode}
    for run in workloads.values():  # warm both (first calls allocate)
        run(baseline, ids), run(ours, ids)
    print(f"{'workload':10s}  {'baseline/ours':>13s}  seconds (median baseline/ours)")
    for name, run in workloads.items():
        pairs = [(run(baseline, ids), run(ours, ids)) for _ in range(args.rounds)]
        base_s = statistics.median(b for b, _ in pairs)
        ours_s = statistics.median(o for _, o in pairs)
        ratio = statistics.median(b / o for b, o in pairs)
        print(f"{name:10s}  {f'x{ratio:.2f}':>13s}  {base_s:.2f}/{ours_s:.2f}")


if __name__ == "__main__":
    main()
