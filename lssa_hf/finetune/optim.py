"""The Trainer used by the recipe: learned per-head temperatures get their own learning rate."""

from __future__ import annotations

from transformers import Trainer

from ..temperature import ATTRIBUTE as TEMPERATURE


def is_temperature(name: str) -> bool:
    return TEMPERATURE in name.split(".")


class AdaptTrainer(Trainer):
    """``Trainer`` whose optimizer puts the per-head temperatures in a group of their own at
    ``temperature_lr`` without weight decay: a few dozen scalars that must move by a factor of
    several, which the LoRA learning rate would take thousands of steps to do."""

    def __init__(self, *args, temperature_lr: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.temperature_lr = temperature_lr

    def create_optimizer(self, model=None):
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if not (fresh and self.temperature_lr):
            return optimizer
        opt_model = self.model if model is None else model
        ids = {id(p) for n, p in opt_model.named_parameters() if p.requires_grad and is_temperature(n)}
        if ids:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
            params = [p for p in opt_model.parameters() if id(p) in ids]
            optimizer.add_param_group({"params": params, "lr": self.temperature_lr, "weight_decay": 0.0})
        return optimizer
