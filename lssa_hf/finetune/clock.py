"""Training wall time that survives a resume: saved in every checkpoint with the Trainer's state."""

from __future__ import annotations

import time

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState


class WallClock(TrainerCallback, ExportableState):
    """Seconds spent training, summed over the processes that trained this run one after another.

    A resumed run restores the seconds stored in its checkpoint (TrainingArguments
    ``restore_callback_states_from_checkpoint``); the work redone after the last checkpoint of a
    killed run is not counted twice. A checkpoint written without it (older runs) leaves ``complete``
    False: only this process's time is known.
    """

    def __init__(self):
        self.seconds = 0.0  # before this process started (restored from the checkpoint)
        self.complete = True
        self._start = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0 and self.seconds == 0.0:
            self.complete = False  # resumed from a checkpoint that did not record its time
        # such a checkpoint's state lacks this entry, and Trainer's next save would fail on it
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())
        self._start = time.time()

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds, self._start = self.total(), None  # stop: evaluation and saving are not training

    def total(self) -> float:
        return self.seconds + (time.time() - self._start if self._start is not None else 0.0)

    def state(self) -> dict:
        return {"args": {}, "attributes": {"seconds": self.total(), "complete": self.complete}}


def wall_clock(trainer) -> WallClock:
    """The trainer's clock (a resume replaces the instance passed in by the one restored)."""
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, WallClock))
