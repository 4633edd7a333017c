"""Teacher weights: a frozen snapshot of the initial student, or an EMA of the student.

A :class:`TeacherWeights` gives a module to score with (``with weights.active() as module:``) and, for an
EMA teacher, :meth:`TeacherWeights.ema_update`. Three kinds, chosen by :func:`make_teacher`:

- full fine-tuning: a deep copy of the student (frozen; EMA moves every trainable parameter);
- LoRA, frozen, fresh adapter (all ``lora_B == 0``, so the student still equals its base): the student
  itself with adapters disabled. No second copy of anything;
- LoRA, EMA (or an adapter that is not fresh): a second adapter ``unisd_teacher`` on the same base model,
  initialised from the student's adapter and activated only while the teacher scores. EMA moves THAT
  adapter toward the student's (the reference code skipped adapter weights, so its EMA teacher never
  moved under LoRA). The base weights exist once.

A teacher module is always used in eval mode under ``torch.inference_mode``/``no_grad`` by the caller.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from unisd_components.ema import ema_update_
from unisd_components.lora import is_peft_model

__all__ = ["TEACHER_ADAPTER", "TeacherWeights", "make_teacher"]

TEACHER_ADAPTER = "unisd_teacher"


class TeacherWeights:
    """Base class: a frozen deep copy of the student (full fine-tuning)."""

    shares_student = False

    def __init__(self, student: nn.Module) -> None:
        self.module = copy.deepcopy(student).eval().requires_grad_(False)
        self._master: nn.Module | None = None  # fp32 EMA accumulator of a bf16/fp16 teacher

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        yield self.module

    def ema_update(self, student: nn.Module, beta: float) -> int:
        low = any(p.dtype in (torch.bfloat16, torch.float16) for p in self.module.parameters())
        if not low:
            return ema_update_(self.module, student, beta)
        # In bf16 the step (1-beta)(theta-phi) mostly falls below the teacher weight's rounding step and
        # the teacher never moves: accumulate in fp32, then round into the teacher.
        if self._master is None:
            self._master = copy.deepcopy(self.module).float()
        updated = ema_update_(self._master, student, beta)
        with torch.no_grad():
            for phi, master in zip(self.module.parameters(), self._master.parameters(), strict=True):
                phi.copy_(master)
        return updated

    def parameters(self) -> list[torch.Tensor]:
        """The teacher's own tensors (for tests: a frozen teacher's never change)."""
        return list(self.module.parameters())


class DisabledAdapterTeacher(TeacherWeights):
    """Frozen teacher under a fresh LoRA adapter: the shared base weights, adapters switched off."""

    shares_student = True

    def __init__(self, student: nn.Module) -> None:
        self.module = student

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        was_training = self.module.training
        self.module.eval()
        try:
            with self.module.disable_adapter():
                yield self.module
        finally:
            self.module.train(was_training)

    def ema_update(self, student: nn.Module, beta: float) -> int:
        raise RuntimeError("a disabled-adapter teacher is frozen; use AdapterTeacher for an EMA teacher")

    def parameters(self) -> list[torch.Tensor]:
        return [p for n, p in self.module.named_parameters() if "lora_" not in n]


class AdapterTeacher(TeacherWeights):
    """Teacher = a second LoRA adapter on the student's base model (EMA under LoRA without a base copy)."""

    shares_student = True

    def __init__(self, student: nn.Module, name: str = TEACHER_ADAPTER) -> None:
        self.module = student
        self.name = name
        self.student_adapter = student.active_adapter
        if name in student.peft_config:
            raise ValueError(f"the model already has an adapter named {name!r}")
        outside = [n for n, p in student.named_parameters() if p.requires_grad and "lora_" not in n]
        if outside:
            raise NotImplementedError(
                f"an EMA teacher under LoRA supports LoRA weights only; also trainable: {outside[:3]}"
            )
        student.add_adapter(name, copy.deepcopy(student.peft_config[self.student_adapter]))
        # add_adapter may re-flag requires_grad: the student adapter stays the active, trainable one.
        student.set_adapter(self.student_adapter)
        self._student_view = _adapter_view(student, self.student_adapter)
        self._teacher_view = _adapter_view(student, name)
        if set(self._student_view) != set(self._teacher_view):
            raise RuntimeError("teacher and student adapters have different structures")
        with torch.no_grad():
            for key, param in self._teacher_view.items():
                param.copy_(self._student_view[key])
                param.requires_grad_(False)

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        was_training = self.module.training
        self.module.eval()
        self.module.set_adapter(self.name, inference_mode=True)
        try:
            yield self.module
        finally:
            self.module.set_adapter(self.student_adapter)
            self.module.train(was_training)

    def ema_update(self, student: nn.Module, beta: float) -> int:
        if student is not self.module:
            raise ValueError("an adapter teacher can only follow the model it lives in")
        student_marker, teacher_marker = f".{self.student_adapter}.", f".{self.name}."
        return ema_update_(
            self.module, self.module, beta, rename=lambda n: n.replace(student_marker, teacher_marker)
        )

    def parameters(self) -> list[torch.Tensor]:
        return list(self._teacher_view.values())

    def is_base(self) -> bool:
        """True while every ``lora_B`` of the teacher's adapter is zero: it computes the base model's function
        (an EMA teacher before its first sync, which starts from the fresh student adapter)."""
        return all(torch.count_nonzero(p).item() == 0 for k, p in self._teacher_view.items() if "lora_B" in k)


def _adapter_view(model: nn.Module, adapter: str) -> nn.ParameterDict:
    """The adapter's parameters under adapter-free names (``ParameterDict`` holds the same tensors)."""
    marker = f".{adapter}."
    view = nn.ParameterDict()
    for name, param in model.named_parameters():
        if "lora_" in name and marker in name:
            view[name.replace(marker, ".").replace(".", "__")] = param
    return view


def _adapter_is_fresh(model: nn.Module) -> bool:
    """True when every ``lora_B`` of the active adapter is zero: the model still equals its base."""
    marker = f".{model.active_adapter}."
    found = False
    for name, param in model.named_parameters():
        if "lora_B" in name and marker in name:
            found = True
            if torch.count_nonzero(param).item() > 0:
                return False
    return found


def make_teacher(student: nn.Module, *, ema: bool, name: str = TEACHER_ADAPTER) -> TeacherWeights:
    """Frozen snapshot of the initial student (``ema=False``) or an EMA teacher (``ema=True``).

    ``name`` names the second adapter when one is needed under LoRA (a KL-to-base reference next to an
    EMA teacher needs its own).
    """
    if not is_peft_model(student):
        return TeacherWeights(student)
    if not ema and _adapter_is_fresh(student):
        return DisabledAdapterTeacher(student)
    return AdapterTeacher(student, name)
