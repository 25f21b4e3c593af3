"""Adam that updates only the embedding rows a batch touched.

Dense Adam reads and writes every row of every embedding table, and both of its moments, at every
step: at 2M users x 64 dimensions that is ~3 s per step on one core, whatever the batch size, so
training time grows with the catalog and the user base instead of with the events. Embeddings built
with ``sparse=True`` (``model.net.sparse=true``) give sparse gradients; :class:`LazyAdam` applies
Adam to the touched rows only, their moments included (the "lazy Adam" of TensorFlow Addons and
``torch.optim.SparseAdam``), and plain Adam, exactly as ``torch.optim.Adam`` computes it, to the
dense parameters (MLP layers, biases, the GRU), so one optimizer serves a whole model.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch


class LazyAdam(torch.optim.Optimizer):
    """Adam for dense gradients, lazy Adam (touched rows only) for sparse ones.

    A row's moments decay only on the steps that touch it, so a rarely seen item keeps its momentum
    between its appearances: the usual trade of lazy Adam, and why it is opt-in. ``weight_decay``
    (L2 added to the gradient, as in ``torch.optim.Adam``) applies to touched rows only on sparse
    parameters.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid LazyAdam settings: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                step_size = lr / (1 - beta1 ** state["step"])
                root_correction = math.sqrt(1 - beta2 ** state["step"])
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                grad = param.grad
                if grad.is_sparse:
                    grad = grad.coalesce()  # one row per touched index, duplicates summed
                    rows, values = grad.indices()[0], grad.values()
                    if decay:
                        values = values.add(param[rows], alpha=decay)
                    avg = exp_avg[rows].mul_(beta1).add_(values, alpha=1 - beta1)
                    avg_sq = exp_avg_sq[rows].mul_(beta2).addcmul_(values, values, value=1 - beta2)
                    exp_avg[rows], exp_avg_sq[rows] = avg, avg_sq
                    denom = (avg_sq.sqrt() / root_correction).add_(eps)
                    param.index_add_(0, rows, avg.div_(denom).mul_(-step_size))
                    continue
                if decay:
                    grad = grad.add(param, alpha=decay)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad.conj(), value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / root_correction).add_(eps)
                param.addcdiv_(exp_avg, denom, value=-step_size)
        return loss


def needs_sparse_support(module: torch.nn.Module) -> bool:
    """Whether ``module`` has embeddings that produce sparse gradients."""
    return any(isinstance(m, torch.nn.Embedding) and m.sparse for m in module.modules())
