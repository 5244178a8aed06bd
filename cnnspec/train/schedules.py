"""Learning-rate schedules as a pure function of the (fractional) epoch.

The trainer asks for ``learning_rate(cfg, epoch + step / steps_per_epoch)`` before every step.
At whole epochs the values equal PyTorch's schedulers stepped once per epoch:

- ``constant``: ``lr``.
- ``step``: ``lr * gamma ** floor(epoch / step_size)`` (``StepLR``).
- ``multistep``: ``lr * gamma ** (number of milestones <= epoch)`` (``MultiStepLR``).
- ``cosine``: from ``lr`` down to ``min_lr`` over the epochs after warm-up,
  ``min_lr + (lr - min_lr) * (1 + cos(pi * t / T)) / 2`` with ``t = epoch - warmup_epochs``,
  ``T = epochs - warmup_epochs`` (``CosineAnnealingLR``; with warm-up, the same as
  ``SequentialLR([LinearLR, CosineAnnealingLR(T_max=T)], milestones=[warmup_epochs])``).

Warm-up (``warmup_epochs`` > 0) multiplies the schedule by a factor rising linearly from
``warmup_start_factor`` (default 0.1, i.e. from lr/10) to 1, like
``LinearLR(start_factor=0.1, total_iters=warmup_epochs)``. Step and milestone epochs count
from the start of training, warm-up included.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

from ..errors import did_you_mean

SCHEDULES = ("constant", "step", "multistep", "cosine")
DEFAULTS: dict[str, Any] = {
    "schedule": "constant",
    "step_size": None,  # required by `step`: no silent default
    "gamma": 0.1,
    "milestones": [],
    "min_lr": 0.0,
    "warmup_epochs": 0,
    "warmup_start_factor": 0.1,
}


def schedule_lacks(cfg: dict[str, Any]) -> str | None:
    """What the chosen schedule needs and ``cfg`` does not give (a message), or None; `check`
    reports it in a spec, `train` refuses it."""
    kind = cfg.get("schedule", "constant")
    if kind == "step" and cfg.get("step_size") is None:
        return "the step schedule needs step_size (lr *= gamma every step_size epochs)"
    if kind == "multistep" and not cfg.get("milestones"):
        return "the multistep schedule needs milestones (epochs at which lr *= gamma)"
    return None


def validate_schedule(cfg: dict[str, Any]) -> None:
    """Raise ValueError, with the option's name, for a schedule that cannot work."""
    c = {**DEFAULTS, **cfg}
    kind = c["schedule"]
    if kind not in SCHEDULES:
        choices = ", ".join(repr(k) for k in SCHEDULES)
        hint = did_you_mean(kind, SCHEDULES)
        raise ValueError(
            f"'schedule' must be one of {choices}, got {kind!r}" + (f"; {hint}" if hint else "")
        )
    if not c.get("lr", 0) > 0:
        raise ValueError(f"lr must be positive, got {c.get('lr')}")
    lacking = schedule_lacks(c)
    if lacking:
        raise ValueError(lacking + "; set it in the spec's train: section")
    if kind == "step" and not c["step_size"] > 0:
        raise ValueError(f"step_size must be positive, got {c['step_size']}")
    if not c["warmup_epochs"] >= 0 or not 0 < c["warmup_start_factor"] <= 1:
        raise ValueError("warmup_epochs must be >= 0 and warmup_start_factor in (0, 1]")
    if kind == "cosine":
        if c.get("epochs") is None or not c["epochs"] > c["warmup_epochs"]:
            raise ValueError("the cosine schedule needs epochs greater than warmup_epochs")
        if not 0 <= c["min_lr"] <= c["lr"]:
            raise ValueError(f"min_lr must be between 0 and lr, got {c['min_lr']}")


def learning_rate(cfg: dict[str, Any], epoch: float) -> float:
    """The learning rate at ``epoch`` (0 = start of training; fractions are allowed)."""
    c = {**DEFAULTS, **cfg}
    lr = float(c["lr"])
    warmup = float(c["warmup_epochs"])
    kind = c["schedule"]
    if kind == "constant":
        rate = lr
    elif kind == "step":
        rate = lr * c["gamma"] ** math.floor(epoch / c["step_size"])
    elif kind == "multistep":
        rate = lr * c["gamma"] ** bisect.bisect_right(sorted(c["milestones"]), epoch)
    elif kind == "cosine":
        span = float(c["epochs"]) - warmup
        t = min(max(epoch - warmup, 0.0), span)
        rate = c["min_lr"] + (lr - c["min_lr"]) * (1 + math.cos(math.pi * t / span)) / 2
    else:
        raise ValueError(
            f"unknown learning-rate schedule {kind!r}; choose one of {', '.join(SCHEDULES)}"
        )
    if epoch < warmup:
        start = float(c["warmup_start_factor"])
        rate *= start + (1.0 - start) * epoch / warmup
    return float(rate)
