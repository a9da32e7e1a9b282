"""Optimisation helpers shared by tarkit's LightningModules."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def warmup_cosine(warmup_steps: int, total_steps: int, floor: float = 0.1):  # noqa: ANN201 (a schedule callable)
    """Learning-rate factor: linear warm-up to 1, then cosine decay to ``floor`` at ``total_steps`` (the
    reference's recipe: 3% warm-up, cosine)."""
    total_steps = max(total_steps, 1)
    warmup_steps = min(warmup_steps, total_steps // 2)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def adamw_warmup_cosine(
    params: list[nn.Parameter],
    lr: float,
    weight_decay: float,
    warmup_steps: int | None,
    total_steps: int,
    owner: str = "the module",
) -> dict[str, Any]:
    """``configure_optimizers`` output: AdamW over ``params`` with a per-step warm-up + cosine, or a constant rate
    when ``warmup_steps`` is ``None``."""
    if not params:
        raise ValueError(f"{owner} has no trainable parameters; check which parts are frozen")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if warmup_steps is None:
        return {"optimizer": optimizer}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
