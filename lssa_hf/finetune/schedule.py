"""A schedule for LSSAR's re-weighting power p during adaptation.

A low p adapts a swapped softmax checkpoint fastest; a sharper one (p=6) extrapolates better past
the context window (docs/finetune_results.md). ``p_schedule`` starts low and ends at the p that is saved and
evaluated: piecewise linear through ``[[step, p], ...]``, constant before the first and after the
last point.
"""

from __future__ import annotations

import math

from transformers import TrainerCallback

from ..patching import settings_of, update_settings


def check_schedule(schedule, p: float, max_steps: int) -> list[tuple[int, float]]:
    """The schedule as (step, p) pairs; a ValueError that names the fix for a malformed one."""
    try:
        points = [(int(step), float(value)) for step, value in schedule]
    except (TypeError, ValueError):
        raise ValueError(f"p_schedule must be a list of [step, p] pairs, e.g. [[0, 3], [240, 3], [360, 6]]; "
                         f"got {schedule!r}.") from None
    if not points:
        raise ValueError("p_schedule is empty: give [[step, p], ...] pairs, or null for a constant p.")
    steps = [step for step, _ in points]
    if steps[0] < 0 or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"p_schedule steps must start at 0 or later and increase strictly; got {steps}.")
    if not all(math.isfinite(value) and value > 0 for _, value in points):
        raise ValueError(f"p_schedule values must be finite and > 0; got {[v for _, v in points]}.")
    if points[-1][1] != p:
        raise ValueError(f"p_schedule ends at p={points[-1][1]:g} but p is {p:g}: set p to the schedule's last "
                         "value (the p the adapted model is saved and evaluated with), or p_schedule to null "
                         "(--set p_schedule=null) for a constant p.")
    if steps[-1] > max_steps:
        raise ValueError(f"p_schedule's last point (step {steps[-1]}) is after max_steps={max_steps}: the model "
                         "would be saved before reaching its final p. Move the point or raise max_steps.")
    return points


def power_at(points, step: float) -> float:
    """p at ``step``: linear between the points, constant outside them."""
    if step <= points[0][0]:
        return points[0][1]
    for (s0, p0), (s1, p1) in zip(points, points[1:]):
        if step <= s1:
            return p0 + (p1 - p0) * (step - s0) / (s1 - s0)
    return points[-1][1]


class PowerSchedule(TrainerCallback):
    """Sets the patched model's p before every optimisation step (so a resumed run follows the same
    schedule) and leaves it at the final p when training ends."""

    def __init__(self, points):
        self.points = points  # [[step, p], ...] as checked by ``check_schedule``

    def _set(self, model, p: float) -> None:
        if settings_of(model).p != p:
            update_settings(model, p=p)  # no re-patching: only config.lssa changes

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._set(model, power_at(self.points, state.global_step))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._set(model, self.points[-1][1])
