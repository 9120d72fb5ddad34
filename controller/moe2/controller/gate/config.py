"""Gate training settings (no torch import: the CLI builds its flags from this)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class TrainConfig(BaseModel):
    """Table VI defaults; every one is a ``moe2ctl train`` flag."""

    hidden: int = Field(default=128, ge=1, description="width of h1 and h2")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="dropout before W3")
    lr: float = Field(default=1e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay")
    batch_size: int = Field(default=8, ge=1, description="samples per micro-batch")
    accumulation: int = Field(default=8, ge=1, description="micro-batches per optimizer step")
    clip: float = Field(default=1.0, gt=0, description="gradient norm clip")
    plateau_factor: float = Field(default=0.8, gt=0, lt=1, description="LR decay on plateau")
    plateau_patience: int = Field(default=50, ge=0, description="evaluations before LR decay")
    eval_every: int = Field(default=10, ge=1, description="optimizer steps between evaluations")
    early_stop: int = Field(default=30, ge=1, description="evaluations without improvement")
    min_delta: float = Field(
        default=1e-3, ge=0, description="relative val-loss improvement that counts (early stop)"
    )
    max_epochs: int = Field(default=200, ge=1, description="upper bound on epochs")
    val_fraction: float = Field(default=0.2, gt=0, lt=1, description="held out for validation")
    seed: int = Field(default=0, description="split and initialisation seed")
