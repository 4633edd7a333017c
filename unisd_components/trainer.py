"""Train one variant: SFT, SDFT, GKD, or SDFT with any subset of the five UniSD mechanisms.

:func:`train_variant` is the whole recipe in plain PyTorch: seed, build the teacher (a frozen copy of the
initial student, or an EMA teacher), let the enabled components prepare their caches with the still
untrained model, then loop: micro-steps (see :mod:`unisd_components.step`), gradient accumulation,
gradient clipping, AdamW with a warm-up schedule, the components' post-step hooks (EMA sync), and one
metrics dict per optimizer step for the callback.

Example::

    from unisd_components import TrainingExample, train_variant
    from unisd_components.config import TrainingConfig
    from unisd_components.presets import PRESETS

    examples = [TrainingExample(id="q1", messages=[{"role": "user", "content": "2+2?"}],
                                demonstration="2+2 = 4. The answer is (B).")]
    result = train_variant(model, tok, examples, PRESETS["unisd_star"], TrainingConfig(max_steps=10),
                           cache_dir=Path("cache"), callback=lambda step, m: print(step, m["loss"]))

Device and precision: the model's own device; bf16 autocast on CUDA only (never on CPU). Under LoRA
(``unisd_components.lora.apply_lora``) only adapter weights train and the teacher shares the base
weights. Several GPUs: launch one process per GPU (``accelerate launch``; see
:mod:`unisd_components.distributed`) and call ``train_variant`` in each with the same arguments: it
shards every global batch of ``batch_size x processes`` prompts and averages the gradients.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from unisd_components import distributed
from unisd_components.config import TrainingConfig, VariantConfig
from unisd_components.lora import is_peft_model
from unisd_components.registry import REGISTRY, SetupContext, build_components
from unisd_components.step import NonFiniteLossError, PhaseTimer, StepRunner
from unisd_components.teachers import make_teacher

__all__ = ["NonFiniteLossError", "TrainResult", "TrainingExample", "model_identity", "train_variant"]

Callback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainingExample:
    """One training prompt with its gold demonstration (``kind``/``choices``/``answer`` shape negatives).

    ``benchmark`` groups examples: agreement donors, retrieval neighbours and induced instructions come
    from the prompt's own benchmark ("" for every example: one group).
    """

    id: str
    messages: list[dict]
    demonstration: str
    kind: str = "text"
    choices: tuple[str, ...] = ()
    answer: str = ""
    benchmark: str = ""


@dataclass
class TrainResult:
    steps: int
    train_seconds: float
    generated_tokens: int
    history: list[dict[str, float]] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    processes: int = 1  # data-parallel processes that trained together (history: their means, token sums)


def train_variant(
    model: nn.Module,
    tokenizer,
    examples: Sequence[TrainingExample],
    variant: VariantConfig,
    training: TrainingConfig,
    *,
    cache_dir: Path | None = None,
    callback: Callback | None = None,
    engine=None,
) -> TrainResult:
    """Train ``model`` in place as ``variant`` describes; returns the step history and timings.

    ``cache_dir`` holds what is generated once (retrieval embeddings, induced instructions, negative
    demonstrations), keyed by model, dataset and prompt version; ``None`` uses a temporary directory.
    ``callback(step, metrics)`` runs after every optimizer step. Raises :class:`NonFiniteLossError`
    naming the step and the term when a loss term (or the updated weights) goes NaN/inf.
    ``engine`` (e.g. :class:`unisd_components.vllm_engine.VLLMEngine` on the same base model) samples the
    on-policy completions instead of ``generate``, from the current weights pushed into it once per
    optimizer step; the loss's log-probabilities are still computed by ``model``.
    """
    if not examples:
        raise ValueError("train_variant needs at least one training example")
    unknown = [n for n in variant.enabled_components() if n not in REGISTRY]
    if unknown:
        raise ValueError(f"components {unknown} have no registry entry")
    if variant.method == "sft" and variant.kl_to_base_beta > 0:
        raise ValueError("kl_to_base_beta applies to the on-policy methods (sdft, gkd), not to sft")
    ids = [ex.id for ex in examples]
    if len(set(ids)) != len(ids):
        raise ValueError("training example ids must be unique (contexts and caches are keyed by id)")
    start = time.perf_counter()
    rank, _ = distributed.world()
    _seed_everything(training.seed + rank)  # processes sample different completions
    device = next(model.parameters()).device
    timer = PhaseTimer(device)
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="unisd-cache-") as tmp:
            return _train(
                model, tokenizer, examples, variant, training, Path(tmp), callback, timer, start, engine
            )
    return _train(
        model, tokenizer, examples, variant, training, Path(cache_dir), callback, timer, start, engine
    )


# Setup generations (contrastive negatives) on a CPU decode this many prompts at once: a decoding step
# reads every weight whatever the rows, so 64 rows cost about twice 16 (the quickstart's 64 negatives:
# 22.8 s in one batch against 27.7 s in four). On a GPU they run in training batches (memory).
_CPU_SETUP_GENERATION_ROWS = 64


def _setup_generation_rows(batch_size: int, model) -> int:
    device = next(model.parameters()).device
    return batch_size if device.type == "cuda" else max(batch_size, _CPU_SETUP_GENERATION_ROWS)


def _train(
    model, tokenizer, examples, variant, training, cache_dir, callback, timer, start, engine=None
) -> TrainResult:
    components = build_components(variant)
    setup_start = time.perf_counter()
    if components:
        ctx = SetupContext(
            model=model,
            tokenizer=tokenizer,
            examples=list(examples),
            cache_dir=cache_dir,
            model_id=model_identity(model),
            seed=training.seed,
            # Negative demonstrations stand in for completions: no longer than a completion may be.
            max_new_tokens=training.max_completion_tokens,
            batch_size=_setup_generation_rows(training.batch_size, model),
        )
        with distributed.main_process_first():  # rank 0 writes the shared caches, the others read them
            for component in components:
                component.setup(ctx)
    setup_seconds = time.perf_counter() - setup_start

    history: list[dict[str, float]] = []
    generated = 0
    rank, processes = distributed.world()
    was_training = model.training
    checkpointing = False
    try:  # from here on the model may carry trainer adapters (LoRA teachers): always removed below
        # Every process starts from rank 0's weights (LoRA adapters are initialised at random).
        distributed.broadcast_parameters_([p for p in model.parameters() if p.requires_grad])
        teacher = base = None
        if variant.method != "sft":
            teacher = make_teacher(model, ema=any(c.needs_ema_teacher for c in components))
        if variant.kl_to_base_beta > 0:
            frozen_teacher = teacher is not None and not any(c.needs_ema_teacher for c in components)
            base = teacher if frozen_teacher else make_teacher(model, ema=False, name="unisd_base")

        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameter (frozen model, or LoRA without adapters?)")
        masters = _MasterWeights(params)  # fp32 copies of bf16/fp16 trainable weights (none otherwise)
        optimizer = _adamw(masters.params, training)
        micro_per_epoch = math.ceil(len(examples) / (training.batch_size * processes))
        total_steps = training.max_steps or max(
            1, math.ceil(training.epochs * micro_per_epoch / training.grad_accum)
        )
        if variant.ema is not None and variant.ema.sync_steps > total_steps:
            raise ValueError(
                f"EMA sync_steps {variant.ema.sync_steps} > the {total_steps} optimizer steps of this run: "
                "the teacher would never sync and the variant would train without EMA; lower sync_steps"
            )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(training, total_steps))
        runner = StepRunner(
            model, tokenizer, variant, training, components, teacher, base, timer, training.seed, engine
        )
        # The same global order in every process (seeded by the training seed, not the rank).
        batches = _batches(examples, training.batch_size * processes, training.seed)

        if training.gradient_checkpointing:
            _set_checkpointing(model, True)
            checkpointing = True
        model.train()
        for step in range(1, total_steps + 1):
            before = dict(timer.seconds)
            sums: dict[str, float] = {}
            for _ in range(training.grad_accum):
                batch = distributed.shard(next(batches), rank, processes)
                terms, metrics = _micro_step(runner, variant, batch, step)
                loss = _checked_sum(terms, step)
                with timer.phase("backward"):
                    (loss / training.grad_accum).backward()
                metrics["loss"] = float(loss.detach())
                for name, value in terms.items():
                    metrics[f"loss_{name}"] = float(value.detach())
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value
            row = {k: v / training.grad_accum for k, v in sums.items()}
            row["generated_tokens"] = sums.get("generated_tokens", 0.0)
            with timer.phase("optimizer"):
                distributed.all_reduce_gradients_(params)
                masters.gradients_to_masters()
                row.update(_optimizer_step(model, masters.params, optimizer, scheduler, training, step))
                masters.masters_to_model()
                for component in components:
                    row.update(component.after_optimizer_step(step, model, teacher))
            for phase, seconds in timer.seconds.items():
                row[f"seconds_{phase}"] = seconds - before.get(phase, 0.0)
            row = distributed.mean_metrics(row, sum_keys=("generated_tokens",))
            generated += int(row["generated_tokens"])
            row["step"] = float(step)
            history.append(row)
            if callback is not None:
                callback(step, row)
    finally:
        model.train(was_training)
        if checkpointing:
            _set_checkpointing(model, False)
        _drop_teacher_adapters(model)
    phase_seconds = dict(timer.seconds)
    phase_seconds["setup"] = setup_seconds
    return TrainResult(
        steps=len(history),
        train_seconds=time.perf_counter() - start,
        generated_tokens=generated,
        history=history,
        phase_seconds=phase_seconds,
        processes=processes,
    )


def _micro_step(runner: StepRunner, variant: VariantConfig, batch, step: int):
    if variant.method == "sft":
        return runner.sft(batch, step)
    if variant.method == "gkd":
        assert variant.gkd is not None
        on_policy = runner.gkd_on_policy(variant.gkd.lmbda)
        return runner.distill(batch, step, alpha=variant.gkd.beta, on_policy=on_policy)
    return runner.distill(batch, step, alpha=variant.alpha, on_policy=True)


def _checked_sum(terms: dict[str, torch.Tensor], step: int) -> torch.Tensor:
    """Sum of the loss terms, each checked first so the error names the one that went bad.

    Under data parallelism every process learns of a bad term anywhere and raises too, rather than waiting
    forever for the failed one in the gradient all-reduce.
    """
    if not terms:
        raise ValueError("the variant produced no loss term (match_repr without feature matching?)")
    error = None
    for name, value in terms.items():
        if not torch.isfinite(value).all():
            error = NonFiniteLossError(step, name, float(value.detach().float()))
            break
    failure = distributed.first_failure(error)  # alone: just this process's error
    if error is None and failure is not None:
        raise NonFiniteLossError(step, f"a loss term of process {failure[0]} ({failure[1]})")
    if error is not None:
        raise error
    return sum(terms.values())  # type: ignore[return-value]


def _optimizer_step(
    model, params, optimizer, scheduler, training: TrainingConfig, step: int
) -> dict[str, float]:
    if training.max_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, training.max_grad_norm)
    else:
        grad_norm = torch.linalg.vector_norm(
            torch.stack([p.grad.detach().float().norm() for p in params if p.grad is not None])
        )
    if not torch.isfinite(grad_norm):
        raise NonFiniteLossError(step, "grad_norm", float(grad_norm))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # A finite loss can still produce non-finite weights (an infinite learning rate, an overflow):
    # stop here with a clear error rather than at the next step's sampling.
    norms = torch._foreach_norm([p.detach() for p in params])
    if not torch.isfinite(torch.stack(norms)).all():
        raise NonFiniteLossError(step, "parameters (after the optimizer step)")
    return {"lr": float(lr), "grad_norm": float(grad_norm)}


class _MasterWeights:
    """fp32 master copies of the trainable weights held in bf16/fp16 (full fine-tuning in low precision).

    Why: at lr 2e-5 most AdamW updates are smaller than bf16's rounding step of the weight they update,
    so stepping bf16 weights directly leaves most of them unchanged. The optimizer steps the fp32
    masters; the model gets them rounded after every step. fp32 weights (LoRA adapters, fp32 models)
    are stepped in place: ``params`` is then the model's own list and both copies are no-ops.
    """

    _LOW = (torch.bfloat16, torch.float16)

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.model_params = params
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.params: list[torch.Tensor] = []
        for p in params:
            if p.dtype in self._LOW:
                master = p.detach().float().clone()
                self.pairs.append((p, master))
                self.params.append(master)
            else:
                self.params.append(p)

    def gradients_to_masters(self) -> None:
        for p, master in self.pairs:
            master.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def masters_to_model(self) -> None:
        for p, master in self.pairs:
            p.copy_(master)


def _adamw(params: list[torch.Tensor], training: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel per step where torch supports it (CPU and CUDA): the per-parameter
    loop of the default implementation costs seconds per step on a 135M model on CPU."""
    kwargs = {"lr": training.learning_rate, "weight_decay": training.weight_decay}
    if all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params):
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # dtype/device combination without a fused kernel
            pass
    return torch.optim.AdamW(params, **kwargs)


def _schedule(training: TrainingConfig, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup_ratio`` of the steps, then cosine / linear / constant."""
    warmup = int(math.ceil(training.warmup_ratio * total_steps))

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if training.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if training.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _batches(examples: Sequence[TrainingExample], batch_size: int, seed: int) -> Iterator[list]:
    """Endless micro-batches: a seeded reshuffle each epoch, the last partial batch kept."""
    rng = random.Random(f"{seed}:batches")
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            yield [examples[j] for j in order[i : i + batch_size]]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    """Activation (gradient) checkpointing; non-reentrant, so frozen LoRA inputs need no grad hook."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _drop_teacher_adapters(model: nn.Module) -> None:
    """Remove the trainer's own adapters so the returned model carries only the student's."""
    if not is_peft_model(model):
        return
    for name in ("unisd_teacher", "unisd_base"):
        if name in model.peft_config:
            model.delete_adapter(name)


def model_identity(model: nn.Module) -> str:
    """A cache key for generated artefacts: the model's name plus a fingerprint of its weights.

    Two different models (or the same architecture with other weights) never share negatives or
    induced instructions, even when neither has a hub name (the tiny random test model).
    """
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or type(model).__name__
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    weight = base.get_input_embeddings().weight.detach()
    sample = weight.flatten()[:4096].float().cpu()
    fingerprint = f"{float(sample.sum()):.6e}:{float(sample.abs().sum()):.6e}:{tuple(weight.shape)}"
    return f"{name}@{fingerprint}"
