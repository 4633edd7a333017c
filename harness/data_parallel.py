"""One trial's training over several GPUs: ``accelerate launch`` runs N copies of this module's ``main``.

Why a subprocess: data-parallel training needs one process per GPU from the start (each joins the
process group and owns one device), while the trial process owns Optuna, MLflow and the evaluation. So
the trial writes a job file into its folder, launches the training processes, forwards rank 0's per-step
metrics to its callback as they are written (MLflow curves and progress stay live), and, when they are
done, loads the weights rank 0 saved (:func:`load_trained_weights`) and evaluates them itself. The
launcher needs nothing from the trial: the model comes from :mod:`harness.models`, the examples from
:mod:`harness.data.training`. The files, in ``<trial_dir>/data_parallel/``:

- ``job.json``: the model and data sections of the spec, the variant and the training configs;
- ``history.jsonl``: one line per optimizer step (metrics averaged over the processes);
- ``trained.safetensors``: the trainable tensors after training (LoRA adapters, or every weight);
- ``result.json``: steps, seconds, generated tokens; ``error.json``: a non-finite loss (step, term);
- ``launch.log``: everything the processes printed.

Without CUDA the same launch runs N CPU processes (gloo): slower than one, but it is how the tests cover
this path.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from harness.spec import StudySpec
    from unisd_components.config import TrainingConfig, VariantConfig
    from unisd_components.trainer import TrainResult

__all__ = ["load_trained_weights", "main", "train_in_processes"]

_POLL_SECONDS = 0.5


def train_in_processes(
    processes: int,
    spec: StudySpec,
    variant: VariantConfig,
    training: TrainingConfig,
    *,
    work_dir: Path,
    cache_dir: Path,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``variant`` over ``processes`` processes; return the :class:`TrainResult`, as ``train_variant``.

    ``spec`` supplies the model and the training data. The trained weights stay in ``work_dir``: load
    them into a model with :func:`load_trained_weights`. Raises ``NonFiniteLossError`` as the in-process
    trainer does, and ``RuntimeError`` with the failed process's own error line (or, when none wrote one,
    the tail of the log) when the processes fail otherwise.
    """
    from unisd_components.trainer import NonFiniteLossError, TrainResult

    work_dir.mkdir(parents=True, exist_ok=True)
    for name in ("history.jsonl", "trained.safetensors", "result.json", "error.json"):
        (work_dir / name).unlink(missing_ok=True)
    for stale in work_dir.glob("failure-*.txt"):
        stale.unlink()
    job = {
        "model": spec.model.model_dump(mode="json"),
        "data": spec.data.model_dump(mode="json"),
        "variant": variant.model_dump(mode="json"),
        "training": training.model_dump(mode="json"),
        "cache_dir": str(cache_dir),
    }
    (work_dir / "job.json").write_text(json.dumps(job, indent=2))
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "harness.data_parallel", str(work_dir),
    ]  # fmt: skip
    env = dict(os.environ)
    if spec.model.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the spec asks for the CPU: keep the processes off any GPU
    history = work_dir / "history.jsonl"
    rows: list[dict[str, float]] = []

    def forward(step: int, row: dict[str, float]) -> None:
        rows.append(row)
        if callback is not None:
            callback(step, row)

    with open(work_dir / "launch.log", "wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        offset = 0
        try:
            while proc.poll() is None:
                offset = _forward_new_steps(history, offset, forward)
                time.sleep(_POLL_SECONDS)
        except BaseException:  # Ctrl-C, or the callback raised: stop every training process
            _stop_group(proc)
            raise
        _forward_new_steps(history, offset, forward)
    error_file = work_dir / "error.json"
    if error_file.is_file():
        error = json.loads(error_file.read_text())
        raise NonFiniteLossError(error["step"], error["term"], error.get("value"))
    if proc.returncode != 0:
        failures = sorted(work_dir.glob("failure-*.txt"))
        if failures:
            why = failures[0].read_text(errors="replace").strip()
        else:  # the processes died without a word (killed, out of memory): the log's last lines
            why = "\n".join((work_dir / "launch.log").read_text(errors="replace").strip().splitlines()[-15:])
        raise RuntimeError(
            f"data-parallel training over {processes} processes failed (exit {proc.returncode}): {why}\n"
            f"(log: {work_dir / 'launch.log'})"
        )
    return TrainResult(**json.loads((work_dir / "result.json").read_text()), history=rows)


def load_trained_weights(model: nn.Module, work_dir: Path) -> nn.Module:
    """Copy the tensors the processes saved (LoRA adapters, or every weight) into ``model``, in place.

    ``model`` must have the trained model's structure (the base model with the spec's LoRA applied).
    """
    import torch
    from safetensors.torch import load_file

    trained = load_file(str(work_dir / "trained.safetensors"))
    params = dict(model.named_parameters())
    unknown = sorted(set(trained) - set(params))
    if unknown:
        raise RuntimeError(f"the trained weights do not fit the model: unknown tensors {unknown[:3]}")
    with torch.no_grad():
        for name, tensor in trained.items():
            params[name].copy_(tensor)
    return model


def _forward_new_steps(path: Path, offset: int, callback) -> int:
    """Pass the complete lines written since ``offset`` to the callback; return the new offset."""
    if not path.is_file():
        return offset
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
    for line in data[:end].decode().splitlines():
        if line.strip():
            row = json.loads(line)
            callback(int(row["step"]), row)
    return offset + end


def _stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------------
# The training process (one per GPU)


def main(argv: list[str] | None = None) -> int:
    """Entry of each launched process: ``python -m harness.data_parallel WORK_DIR``."""
    work_dir = Path((argv or sys.argv[1:])[0])
    try:
        return _train_process(work_dir)
    except BaseException as err:  # the trial shows this line instead of the launcher's summary
        rank = os.environ.get("RANK", "0")
        (work_dir / f"failure-{rank}.txt").write_text(f"process {rank}: {type(err).__name__}: {err}")
        raise


def _train_process(work_dir: Path) -> int:
    from unisd_components.cpu_memory import keep_freed_memory

    keep_freed_memory()
    import torch
    from safetensors.torch import save_file

    from harness.data.training import load_train_examples
    from harness.models import load_model, with_spec_lora
    from harness.spec import DataSpec, ModelSpec
    from unisd_components import TrainingConfig, VariantConfig, train_variant
    from unisd_components.distributed import init_data_parallel, world
    from unisd_components.trainer import NonFiniteLossError

    job = json.loads((work_dir / "job.json").read_text())
    device = init_data_parallel()
    rank, _ = world()
    model_spec, data_spec = ModelSpec(**job["model"]), DataSpec(**job["data"])
    model, tokenizer = load_model(model_spec.ref, device=str(device), dtype=model_spec.dtype)
    model = with_spec_lora(model, model_spec.lora)
    history = open(work_dir / "history.jsonl", "a") if rank == 0 else None

    def write_step(step: int, metrics: dict[str, float]) -> None:
        history.write(json.dumps({"step": step, **metrics}) + "\n")
        history.flush()

    try:
        result = train_variant(
            model,
            tokenizer,
            load_train_examples(data_spec),
            VariantConfig(**job["variant"]),
            TrainingConfig(**job["training"]),
            cache_dir=Path(job["cache_dir"]),
            callback=write_step if rank == 0 else None,
        )
    except NonFiniteLossError as err:  # every process raises it; rank 0 tells the trial
        if rank == 0:
            payload = {"step": err.step, "term": err.term, "value": err.value}
            (work_dir / "error.json").write_text(json.dumps(payload))
        return 3
    finally:
        if history is not None:
            history.close()
    if rank == 0:
        trained = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trained, str(work_dir / "trained.safetensors"))
        fields = ("steps", "train_seconds", "generated_tokens", "phase_seconds", "processes")
        (work_dir / "result.json").write_text(json.dumps({f: getattr(result, f) for f in fields}))
    torch.distributed.barrier()  # nobody leaves before the weights are written
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
