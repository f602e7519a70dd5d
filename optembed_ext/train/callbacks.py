"""Callbacks: the hooks through which a method's search schedule plugs into the one trainer.

Order within a training step::

    on_batch_begin(trainer, ids, labels)   # e.g. OptEmbed samples per-sample dimensions
    forward, loss = BCE + embedding.regularization(), backward
    on_after_backward(trainer)             # gradients are populated, before clipping and the optimizer step
    optimizer.step(); trainer.global_step += 1
    on_batch_end(trainer, loss)            # e.g. AutoDim takes an architecture step on trainer.next_val_batch()

After each epoch the trainer evaluates the validation split and calls ``on_epoch_end(trainer, epoch,
val_metrics)`` before the early-stopping decision and the checkpoint; a callback may set
``trainer.stop_training = True``. ``state_dict`` / ``load_state_dict`` are saved in / restored from the
checkpoint, so a resumed run continues exactly.
"""
from __future__ import annotations


class Callback:
    """Base callback; every hook is a no-op."""

    def on_train_begin(self, trainer) -> None:
        pass

    def on_batch_begin(self, trainer, ids, labels) -> None:
        pass

    def on_after_backward(self, trainer) -> None:
        pass

    def on_batch_end(self, trainer, loss: float) -> None:
        pass

    def on_epoch_end(self, trainer, epoch: int, val_metrics: dict) -> None:
        pass

    def on_train_end(self, trainer) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LambdaCallback(Callback):
    """Callback built from plain functions, e.g. ``LambdaCallback(on_batch_end=lambda tr, loss: ...)``."""

    _HOOKS = ("on_train_begin", "on_batch_begin", "on_after_backward", "on_batch_end", "on_epoch_end",
              "on_train_end")

    def __init__(self, **hooks):
        unknown = set(hooks) - set(self._HOOKS)
        if unknown:
            raise TypeError(f"unknown hook(s) {sorted(unknown)}; known: {list(self._HOOKS)}")
        for name, fn in hooks.items():
            setattr(self, name, fn)
