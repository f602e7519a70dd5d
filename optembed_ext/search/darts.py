"""DARTS architecture steps on validation batches, shared by the searches that learn architecture weights.

:class:`DartsArchitectureCallback` updates an embedding's architecture weights ``alpha`` (AutoDim's candidate
weights, AutoField's field gates) with their own Adam optimizer on ``trainer.next_val_batch()`` after every
training step (``arch_every``):

- first order (default): ``grad_alpha L_val(w, alpha)`` with the current weights ``w``;
- second order (``second_order=True``): the unrolled gradient of DARTS,
  ``grad_alpha L_val(w', alpha) - xi * (grad_alpha L_train(w+, alpha) - grad_alpha L_train(w-, alpha)) / (2 eps)``
  with ``w' = w - xi grad_w L_train(w, alpha)``, ``w+- = w +- eps grad_w' L_val(w', alpha)``.

The Gumbel-softmax temperature follows ``tau = max(min_temperature, 1 - temperature_decay * step)`` (AutoDim
paper: ``max(0.01, 1 - 5e-5 t)``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..train.callbacks import Callback


def temperature_at(step: int, decay: float = 5e-5, minimum: float = 0.01) -> float:
    """Gumbel-softmax temperature after ``step`` training steps: ``max(minimum, 1 - decay * step)``."""
    return max(float(minimum), 1.0 - float(decay) * int(step))


class DartsArchitectureCallback(Callback):
    """Updates an embedding's architecture weights on validation batches (first- or second-order DARTS).

    The embedding must provide ``arch_parameters()`` and a ``temperature`` attribute. The architecture
    parameters get their own Adam optimizer; their gradient from the training loss is discarded in
    ``on_after_backward``, so the trainer's optimizer never moves them even if it holds them.

    Args:
        embedding: the model's embedding module (AutoDim or AutoField supernet).
        arch_lr / arch_weight_decay: Adam settings of the architecture optimizer.
        arch_every: take an architecture step every that many training steps.
        temperature_decay / min_temperature: the temperature schedule (:func:`temperature_at`).
        second_order: use the unrolled second-order gradient instead of the first-order one.
        unrolled_lr: ``xi`` of the second-order step (default: the trainer's learning rate).
    """

    def __init__(self, embedding, arch_lr: float = 1e-3, arch_weight_decay: float = 0.0, arch_every: int = 1,
                 temperature_decay: float = 5e-5, min_temperature: float = 0.01, second_order: bool = False,
                 unrolled_lr: float | None = None):
        if not hasattr(embedding, "arch_parameters"):
            raise TypeError(f"embedding must define arch_parameters(), got {type(embedding).__name__}")
        if isinstance(arch_every, bool) or not isinstance(arch_every, int) or arch_every < 1:
            raise ValueError(f"arch_every must be a positive int, got {arch_every!r}")
        if not arch_lr > 0:
            raise ValueError(f"arch_lr must be > 0, got {arch_lr!r}")
        self.embedding = embedding
        self.arch_params = list(embedding.arch_parameters())
        self.arch_every = arch_every
        self.temperature_decay = float(temperature_decay)
        self.min_temperature = float(min_temperature)
        self.second_order = bool(second_order)
        self.unrolled_lr = unrolled_lr
        self.optimizer = torch.optim.Adam(self.arch_params, lr=arch_lr, weight_decay=arch_weight_decay)
        self._train_batch = None
        self.arch_steps = 0
        self.history: list[dict] = []

    # ----------------------------------------------------------------- hooks
    def _set_temperature(self, step: int) -> None:
        self.embedding.temperature = temperature_at(step, self.temperature_decay, self.min_temperature)

    def on_train_begin(self, trainer) -> None:
        self._set_temperature(int(getattr(trainer, "global_step", 0)))

    def on_batch_begin(self, trainer, ids, labels) -> None:
        self._set_temperature(int(getattr(trainer, "global_step", 0)))
        if self.second_order:
            self._train_batch = (ids, labels)

    def on_after_backward(self, trainer) -> None:
        for p in self.arch_params:
            p.grad = None

    def on_batch_end(self, trainer, loss: float) -> None:
        step = int(getattr(trainer, "global_step", 0))
        self._set_temperature(step)
        if step % self.arch_every != 0:
            return
        val_ids, val_labels = trainer.next_val_batch()
        model = trainer.model
        if self.second_order and self._train_batch is not None:
            grads = self._second_order_grads(trainer, model, val_ids, val_labels)
        else:
            val_loss = self._loss(model, val_ids, val_labels)
            grads = torch.autograd.grad(val_loss, self.arch_params, allow_unused=True)
        for p, g in zip(self.arch_params, grads):
            p.grad = None if g is None else g.detach()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.arch_steps += 1

    def on_epoch_end(self, trainer, epoch: int, val_metrics: dict) -> None:
        self.history.append({"epoch": int(epoch), "temperature": float(self.embedding.temperature),
                             "alpha": [p.detach().cpu().tolist() for p in self.arch_params]})

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "arch_steps": self.arch_steps,
                "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.arch_steps = int(state.get("arch_steps", 0))
        self.history = list(state.get("history", []))

    # ---------------------------------------------------------------- losses
    @staticmethod
    def _loss(model, ids, labels, params=None):
        logits = model(ids) if params is None else functional_call(model, params, (ids,))
        loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        reg = getattr(model.embedding, "regularization", None)
        if reg is not None and params is None:
            loss = loss + reg()
        return loss

    def _second_order_grads(self, trainer, model, val_ids, val_labels):
        arch_ids = {id(p) for p in self.arch_params}
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in arch_ids]
        names = [n for n, _ in named]
        weights = [p for _, p in named]
        arch_named = {n: p for n, p in model.named_parameters() if id(p) in arch_ids}
        xi = self.unrolled_lr
        if xi is None:
            xi = float(trainer.optimizer.param_groups[0]["lr"]) if getattr(trainer, "optimizer", None) else 1e-3
        tr_ids, tr_labels = self._train_batch
        # w' = w - xi * grad_w L_train(w, alpha)
        g_train = torch.autograd.grad(self._loss(model, tr_ids, tr_labels), weights, allow_unused=True)
        unrolled = {n: (w - xi * g).detach().requires_grad_(True) if g is not None else w.detach()
                    for n, w, g in zip(names, weights, g_train)}
        params = {**unrolled, **arch_named}
        val_loss = self._loss(model, val_ids, val_labels, params=params)
        trainable = [n for n in names if unrolled[n].requires_grad]
        out = torch.autograd.grad(val_loss, self.arch_params + [unrolled[n] for n in trainable], allow_unused=True)
        d_alpha, d_w = out[:len(self.arch_params)], out[len(self.arch_params):]
        dw = {n: g for n, g in zip(trainable, d_w) if g is not None}
        if not dw:
            return d_alpha
        norm = torch.sqrt(sum((g * g).sum() for g in dw.values()))
        eps = 0.01 / (float(norm) + 1e-12)

        def arch_grad(sign):
            shifted = {n: (w.detach() + sign * eps * dw[n]) if n in dw else w.detach() for n, w in zip(names, weights)}
            loss = self._loss(model, tr_ids, tr_labels, params={**shifted, **arch_named})
            return torch.autograd.grad(loss, self.arch_params, allow_unused=True)

        g_plus, g_minus = arch_grad(1.0), arch_grad(-1.0)
        result = []
        for da, gp, gm in zip(d_alpha, g_plus, g_minus):
            if da is None:
                result.append(None)
                continue
            hess = 0 if gp is None or gm is None else (gp - gm) / (2 * eps)
            result.append(da - xi * hess)
        return result
