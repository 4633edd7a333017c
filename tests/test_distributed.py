"""Data-parallel training: two gloo processes on the CPU stand in for two GPUs.

What must hold: the processes end with identical weights (student, and an EMA teacher's adapter too);
two processes at per-process batch 2 train exactly like one process at batch 4 when the step is
deterministic (SFT, and GKD on gold completions); a bad loss on one process stops both with a clear error
instead of leaving one waiting in the all-reduce.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from test_trainer import _examples

from unisd_components import distributed
from unisd_components.config import (
    AgreementConfig,
    ClippingConfig,
    ContrastiveConfig,
    EMAConfig,
    FeatureMatchingConfig,
    GKDConfig,
    TrainingConfig,
    VariantConfig,
)

WORLD = 2
TRAINING = dict(
    max_steps=3, max_completion_tokens=8, learning_rate=1e-2, warmup_ratio=0.0, max_grad_norm=None
)
DETERMINISTIC = {
    "sft": VariantConfig(method="sft"),
    "gkd_gold": VariantConfig(method="gkd", gkd=GKDConfig(beta=0.5, lmbda=0.0)),
}
ALL_FIVE = VariantConfig(
    agreement=AgreementConfig(k=2, strategy="random"),
    contrastive=ContrastiveConfig(),
    ema=EMAConfig(sync_steps=1, beta=0.5),
    feature_matching=FeatureMatchingConfig(),
    clipping=ClippingConfig(),
)


def _tiny(lora_seed: int | None = None):
    from harness.models import TINY_RANDOM_LLAMA, load_model

    model, tok = load_model(TINY_RANDOM_LLAMA, device="cpu")
    if lora_seed is not None:
        from unisd_components.lora import apply_lora

        torch.manual_seed(lora_seed)  # a different random adapter in each process: training must sync them
        model = apply_lora(model, r=4)
    return model, tok


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, init_file: str, out: str, job: str) -> None:
    import torch.distributed as dist

    from unisd_components import trainer as trainer_module
    from unisd_components.trainer import NonFiniteLossError, train_variant

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    result: dict = {}
    try:
        if job in DETERMINISTIC:
            model, tok = _tiny()
            variant = DETERMINISTIC[job]
        else:
            model, tok = _tiny(lora_seed=rank)
            variant = ALL_FIVE
        if job == "nan_on_rank_1":
            micro_step = trainer_module._micro_step

            def poisoned(runner, variant, batch, step):
                terms, metrics = micro_step(runner, variant, batch, step)
                if rank == 1 and step == 2:
                    terms["divergence"] = terms["divergence"] * float("nan")
                return terms, metrics

            trainer_module._micro_step = poisoned
        before = _state(model)
        try:
            res = train_variant(
                model,
                tok,
                _examples(),
                variant,
                TrainingConfig(batch_size=2, **TRAINING),
                cache_dir=Path(out) / "cache",
            )
            result = {"history": res.history, "processes": res.processes, "generated": res.generated_tokens}
        except NonFiniteLossError as err:
            result = {"error": str(err), "step": err.step}
        result["before"], result["after"] = before, _state(model)
    except BaseException:  # noqa: BLE001  (report, so the test shows the worker's traceback)
        result = {"crash": traceback.format_exc()}
    finally:
        torch.save(result, Path(out) / f"rank{rank}.pt")
        dist.destroy_process_group()


def _run_world(tmp_path: Path, job: str) -> list[dict]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(r, str(tmp_path / "init"), str(tmp_path), job))
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    for p in procs:
        if p.is_alive():
            p.kill()
            pytest.fail(f"{job}: a data-parallel process hung")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert "crash" not in res, f"rank {r} crashed:\n{res['crash']}"
    return results


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0.0, msg=key)


@pytest.mark.parametrize("job", sorted(DETERMINISTIC))
def test_two_processes_at_batch_2_train_like_one_at_batch_4(job, tmp_path):
    from unisd_components.trainer import train_variant

    model, tok = _tiny()
    single = train_variant(
        model, tok, _examples(), DETERMINISTIC[job], TrainingConfig(batch_size=4, **TRAINING)
    )
    ranks = _run_world(tmp_path, job)
    _assert_same(ranks[0]["after"], ranks[1]["after"])
    # Adam turns float noise in near-zero gradients into differences of up to ~2e-5 at this learning rate
    # (1e-2); a wrong shard or a missing average moves weights by ~1e-2.
    _assert_same(ranks[0]["after"], _state(model), atol=1e-4)
    assert any(not torch.equal(ranks[0]["before"][k], ranks[0]["after"][k]) for k in ranks[0]["before"])
    # The logged loss is the mean over the processes: the single process's loss over the same 4 examples;
    # the gradient norm shows the gradients are averaged, not summed (Adam alone would not tell).
    for mine, theirs in zip(ranks[0]["history"], single.history, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
    assert ranks[0]["processes"] == WORLD and single.processes == 1


def test_all_five_components_stay_in_sync_under_lora(tmp_path):
    ranks = _run_world(tmp_path, "all_five")
    before0, before1 = ranks[0]["before"], ranks[1]["before"]
    lora_a = [k for k in before0 if "lora_A" in k]
    assert lora_a and any(not torch.equal(before0[k], before1[k]) for k in lora_a)  # different inits
    _assert_same(ranks[0]["after"], ranks[1]["after"])  # synced: student adapter and base
    moved = [k for k in lora_a if not torch.equal(ranks[0]["after"][k], before0[k])]
    assert moved, "the student adapter did not train"
    # The identical metrics on both processes are means over them; tokens are summed.
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["generated"] == sum(row["generated_tokens"] for row in ranks[0]["history"]) > 0
    assert len(list((tmp_path / "cache").glob("negatives-*.json"))) == 1  # written once, by rank 0


def test_a_bad_loss_on_one_process_stops_both(tmp_path):
    ranks = _run_world(tmp_path, "nan_on_rank_1")
    assert ranks[1]["error"].startswith("non-finite loss at optimizer step 2: term 'divergence'")
    assert ranks[0]["step"] == 2 and "process 1" in ranks[0]["error"], ranks[0]["error"]


def test_shard_gives_every_process_a_share():
    batch = list("abcde")
    assert [distributed.shard(batch, r, 2) for r in range(2)] == [list("ace"), list("bd")]
    assert [distributed.shard(list("ab"), r, 3) for r in range(3)] == [["a"], ["b"], ["a"]]
    assert distributed.shard(batch, 0, 1) is batch


def test_alone_the_collectives_are_no_ops():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    distributed.all_reduce_gradients_([p])
    distributed.broadcast_parameters_([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0)) and torch.equal(p.detach(), torch.ones(3))
    assert distributed.world() == (0, 1)
    assert distributed.mean_metrics({"loss": 1.5}) == {"loss": 1.5}
    assert distributed.first_failure(None) is None


def test_a_trial_trains_over_two_launched_processes_like_one_process(tmp_path, data_dir):
    """The harness path: `accelerate launch` starts two processes, the trial forwards their per-step
    metrics and loads the weights they saved into its model; SFT at 2 x batch 2 matches one process at
    batch 4."""
    from types import SimpleNamespace

    from harness.data.training import load_train_examples
    from harness.spec import DataSpec, ModelSpec
    from harness.trial import TrialContext, _train_in_processes
    from unisd_components.trainer import train_variant

    spec = SimpleNamespace(
        model=ModelSpec(ref="tiny-random:llama", device="cpu", dtype="float32"),
        data=DataSpec(train=["scienceqa"], train_size=6, data_dir=str(data_dir)),
    )
    variant = DETERMINISTIC["sft"]
    ctx = TrialContext(
        number=0, output_dir=tmp_path, trial_dir=tmp_path / "trial", cache_dir=tmp_path / "cache"
    )
    ctx.processes = 2
    seen: list[int] = []
    base, _ = _tiny()
    trial_model, result = _train_in_processes(
        base,
        spec,
        variant,
        TrainingConfig(batch_size=2, **TRAINING),
        ctx,
        callback=lambda step, metrics: seen.append(step),
    )
    assert seen == [1, 2, 3] and result.steps == 3 and result.processes == 2
    model, tok = _tiny()
    single = train_variant(
        model, tok, load_train_examples(spec.data), variant, TrainingConfig(batch_size=4, **TRAINING)
    )
    _assert_same(_state(trial_model), _state(model), atol=1e-4)
    assert not torch.equal(_state(trial_model)["model.norm.weight"], _state(base)["model.norm.weight"])
    for mine, theirs in zip(result.history, single.history, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)


def test_a_failed_launch_reports_its_log(tmp_path, data_dir):
    from types import SimpleNamespace

    from harness.data_parallel import train_in_processes
    from harness.spec import DataSpec, ModelSpec

    spec = SimpleNamespace(
        model=ModelSpec(ref=str(tmp_path / "no-such-model"), device="cpu"),
        data=DataSpec(train=["scienceqa"], train_size=2, data_dir=str(data_dir)),
    )
    with pytest.raises(RuntimeError, match="data-parallel training over 2 processes failed") as err:
        train_in_processes(2, spec, VariantConfig(), TrainingConfig(), work_dir=tmp_path, cache_dir=tmp_path)
    assert "no-such-model" in str(err.value)
