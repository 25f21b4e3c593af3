"""User-level differential privacy (DP-SGD with Opacus): settings, noise calibration, per-user
gradients, accounting. No Lightning here; ``rectrain.tasks.base`` calls it from the training step.

What is protected: one *user's whole training data* (every event of the user is one record, see
``rectrain.data.records``). Each step Poisson-samples users; every sampled user's gradient is
computed on that user's record alone, clipped to ``max_grad_norm`` and summed, Gaussian noise of
std ``noise_multiplier * max_grad_norm`` is added and the sum divided by the expected number of
users (Opacus's ``DPOptimizer``); Opacus's accountant (RDP by default, or PRV) tracks the spent
epsilon. The noise multiplier is chosen before training (Opacus's ``get_noise_multiplier``) so that
the target epsilon is reached exactly after the configured epochs.

Why per-user gradients come from ``torch.func`` (``vmap`` over users of ``grad`` of the user's
loss) and not from Opacus's ``GradSampleModule`` hooks: the hooks derive a layer's per-sample
gradients from its own inputs, taking dim 0 as the sample. The two-tower model scores the whole
catalog through the item tower once per batch (dim 0 is the *item*) and reads the tied item
embedding's ``weight`` outside any module call, so hooks would attribute the item tower's
gradients to the wrong rows or miss them. ``vmap`` differentiates each user's loss exactly, for
every parameter (checked against a one-user backward pass in tests/test_privacy.py); clipping,
noise and accounting stay Opacus's. ``nn.GRU``/``nn.LSTM`` call a fused kernel that ``vmap``
cannot batch, so they are replaced by Opacus's ``DPGRU``/``DPLSTM`` (same state-dict names:
checkpoints and ONNX export see a plain GRU/LSTM again); any layer Opacus's ``ModuleValidator``
still rejects (e.g. BatchNorm, which mixes users in a batch) is a config error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
import typing
from typing import Any, Callable, Literal

import torch
from torch import nn

from rectrain.errors import ConfigError

Accountant = Literal["rdp", "prv"]
ACCOUNTANTS = typing.get_args(Accountant)


@dataclass
class DPSettings:
    """``privacy=dp``: user-level (epsilon, delta)-DP by DP-SGD.

    Args:
        epsilon: the privacy budget reached at the end of ``trainer.max_epochs``.
        delta: null = 1 / number of users with training data.
        max_grad_norm: each user's gradient is clipped to this L2 norm.
        accountant: ``rdp`` (Renyi DP, Opacus's default) or ``prv`` (tighter, slower).
        users_per_step: expected users per step; the sampling rate is this / number of users.
        events_per_user: NCF: positives of a user read per step (a random subset when more).
        windows_per_user: two-tower: history windows of a user read per step.
        max_noise_multiplier: refuse settings that need more noise than this (nothing is learnt).
    """

    epsilon: float = 8.0
    delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: Accountant = "rdp"
    users_per_step: int = 256
    events_per_user: int = 64
    windows_per_user: int = 1
    max_noise_multiplier: float = 50.0

    def __post_init__(self) -> None:
        if not (isinstance(self.epsilon, (int, float)) and math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ConfigError("privacy.epsilon", f"must be a finite number > 0, got {self.epsilon!r}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError("privacy.delta", f"must be in (0, 1) or null (1 / number of users), got {self.delta!r}")
        if not self.max_grad_norm > 0:
            raise ConfigError("privacy.max_grad_norm", f"must be > 0, got {self.max_grad_norm!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError("privacy.accountant", f"must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        for key in ("users_per_step", "events_per_user", "windows_per_user"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"privacy.{key}", f"must be >= 1, got {getattr(self, key)!r}")


def calibrate_noise(settings: DPSettings, n_users: int, epochs: int) -> dict[str, Any]:
    """The noise multiplier that spends exactly ``settings.epsilon`` over ``epochs`` epochs.

    Returns the plan (sample rate, steps per epoch, steps, delta, noise multiplier).

    Raises:
        ConfigError: when the budget cannot be reached with a noise multiplier the model can learn
            under (``max_noise_multiplier``), or the numbers make no sense.
    """
    from opacus.accountants.utils import get_noise_multiplier

    if n_users < 2:
        raise ConfigError("privacy", f"user-level DP needs users to hide among; the training data has {n_users}")
    if epochs is None or int(epochs) < 1:
        raise ConfigError("trainer.max_epochs", f"privacy=dp calibrates noise for a fixed number of epochs; got {epochs!r}")
    sample_rate = min(1.0, settings.users_per_step / n_users)
    steps_per_epoch = max(1, round(1.0 / sample_rate))
    steps = steps_per_epoch * int(epochs)
    delta = settings.delta if settings.delta is not None else 1.0 / n_users
    try:
        sigma = get_noise_multiplier(target_epsilon=settings.epsilon, target_delta=delta, sample_rate=sample_rate,
                                     steps=steps, accountant=settings.accountant, epsilon_tolerance=0.005)
    except ValueError as exc:
        sigma = math.inf
        reason = str(exc)
    else:
        reason = ""
    if not sigma <= settings.max_noise_multiplier:
        raise ConfigError("privacy.epsilon", f"epsilon {settings.epsilon} with delta {delta:.3g} cannot be reached in "
                          f"{epochs} epochs ({steps} steps at sampling rate {sample_rate:.4f}) with a noise multiplier "
                          f"<= {settings.max_noise_multiplier} (needs {sigma:.3g}{'; ' + reason if reason else ''}): "
                          "raise privacy.epsilon or privacy.users_per_step, or lower trainer.max_epochs")
    return {"sample_rate": sample_rate, "steps_per_epoch": steps_per_epoch, "planned_steps": steps,
            "planned_epochs": int(epochs), "delta": delta, "noise_multiplier": float(sigma)}


def make_dp_compatible(net: nn.Module) -> nn.Module:
    """Replace ``nn.GRU``/``nn.LSTM`` by Opacus's DPGRU/DPLSTM (weights copied; same state-dict
    names), then check the net with Opacus's ModuleValidator. Returns ``net`` (changed in place).

    Raises:
        ConfigError: a layer Opacus cannot train privately (named).
    """
    from opacus.layers import DPGRU, DPLSTM
    from opacus.validators import ModuleValidator

    replacements = {nn.GRU: DPGRU, nn.LSTM: DPLSTM}
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            kind = replacements.get(type(child))
            if kind is None:
                continue
            if not child.batch_first or child.bidirectional or getattr(child, "proj_size", 0):
                raise ConfigError("model.net.cell", f"{type(child).__name__} with these options has no Opacus "
                                  "replacement (batch_first, one direction, no projection are supported)")
            new = kind(child.input_size, child.hidden_size, num_layers=child.num_layers, bias=child.bias,
                       batch_first=True, dropout=child.dropout)
            new.load_state_dict(child.state_dict())
            setattr(parent, name, new)
    errors = ModuleValidator.validate(net, strict=False)
    if errors:
        first = str(errors[0]).split(". ")[0]
        raise ConfigError("privacy", f"{type(net).__name__} has a layer Opacus cannot train with user-level DP: {first}")
    return net


def dp_layer_aliases(net: nn.Module, prefix: str = "net.") -> list[tuple[str, str]]:
    """(cell key, nn.GRU/nn.LSTM key) state-dict pairs of the Opacus layers in ``net``.

    A checkpoint keeps only the nn.GRU/nn.LSTM names (so export rebuilds a plain RNN): drop the cell
    keys on save, copy them back from the RNN names before a DP run loads its own checkpoint.
    """
    from opacus.layers.param_rename import RenameParamsMixin

    return [(f"{prefix}{name}.{old}", f"{prefix}{name}.{new}") for name, module in net.named_modules()
            if isinstance(module, RenameParamsMixin) for old, new in module.old_to_new.items()]


class _RecordLoss(nn.Module):
    """``net`` under the name the task gives it, so ``functional_call`` can swap its parameters."""

    def __init__(self, net: nn.Module, loss: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> None:
        super().__init__()
        self.net = net
        self._loss = loss

    def forward(self, record: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._loss(record)


def _parameter_slots(net: nn.Module) -> dict[str, list[str]]:
    """Each trainable parameter's name (as ``net.named_parameters()`` gives it) -> the module
    attributes that hold it and that the forward pass reads.

    Opacus's DPGRU/DPLSTM register every weight twice: inside their cells (what the forward uses)
    and under nn.GRU's names on the RNN module itself (an alias for state dicts). Swapping the alias
    would not reach the forward, and the alias's ``__setattr__`` hook re-registers parameters as
    they are swapped, so only the cell attributes are swapped here. A module shared by two parents
    (tied embeddings) is one slot; a Parameter held by two modules is two slots, gradients summed.
    """
    from opacus.layers.param_rename import RenameParamsMixin

    names = {id(p): n for n, p in net.named_parameters() if p.requires_grad}
    slots: dict[str, list[str]] = {}
    for prefix, module in net.named_modules():
        aliases = module.new_to_old if isinstance(module, RenameParamsMixin) else {}
        for key, param in module._parameters.items():
            if param is None or key in aliases or id(param) not in names:
                continue
            slots.setdefault(names[id(param)], []).append(f"{prefix}.{key}" if prefix else key)
    return slots


def per_user_gradients(net: nn.Module, record_loss: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                       batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each row's gradient of ``record_loss`` (one user's record, no batch dim) w.r.t. ``net``.

    Args:
        net: the model; ``record_loss`` must compute through it (its parameters are swapped in).
        record_loss: one record (a dict of tensors without the batch dim) -> scalar loss.
        batch: records stacked on dim 0.

    Returns:
        ({"net.<name>": (B, *param.shape)}, (B,) losses), parameter names as the task names them.
    """
    from torch.func import functional_call, grad_and_value, vmap

    wrapper = _RecordLoss(net, record_loss)
    params = dict(net.named_parameters())
    slots = _parameter_slots(net)
    b = next(iter(batch.values())).shape[0]
    if b == 0:  # a Poisson draw may sample nobody: zero per-user gradients, DPOptimizer adds noise only
        return {f"net.{k}": torch.zeros((0, *params[k].shape), dtype=params[k].dtype, device=params[k].device)
                for k in slots}, torch.zeros(0)
    leaves = {f"net.{slot}": params[name].detach() for name, held in slots.items() for slot in held}

    def loss_of(p: dict[str, torch.Tensor], record: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(wrapper, p, (record,), tie_weights=False, strict=False)

    grads, losses = vmap(grad_and_value(loss_of), in_dims=(None, 0), randomness="different")(leaves, batch)
    per_name = {f"net.{name}": sum(grads[f"net.{slot}"] for slot in held) for name, held in slots.items()}
    return per_name, losses.detach()


class UserLevelDP:
    """The privacy state of one training run: the plan, Opacus's accountant and its DPOptimizer.

    Args:
        settings: the ``privacy=dp`` settings.
        n_users: users that own training records.
        epochs: the epochs the noise is calibrated for (``trainer.max_epochs``).
    """

    def __init__(self, settings: DPSettings, n_users: int, epochs: int) -> None:
        from opacus.accountants import create_accountant

        self.settings, self.n_users = settings, int(n_users)
        self.plan = calibrate_noise(settings, self.n_users, epochs)
        self.accountant = create_accountant(mechanism=settings.accountant)

    @property
    def sample_rate(self) -> float:
        return float(self.plan["sample_rate"])

    @property
    def delta(self) -> float:
        return float(self.plan["delta"])

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Opacus's DPOptimizer around ``optimizer``: per-user clipping, noise, mean over the expected
        users per step, one accountant step per optimiser step."""
        from opacus.optimizers import DPOptimizer

        dp = DPOptimizer(optimizer, noise_multiplier=self.plan["noise_multiplier"],
                         max_grad_norm=self.settings.max_grad_norm,
                         expected_batch_size=max(1, round(self.sample_rate * self.n_users)), loss_reduction="mean")
        dp.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        return dp

    def steps_taken(self) -> int:
        return int(sum(entry[2] for entry in self.accountant.history))

    def epsilon_spent(self) -> float:
        if not self.accountant.history:
            return 0.0
        return float(self.accountant.get_epsilon(delta=self.delta))

    def report(self) -> dict[str, Any]:
        """What results.json, TensorBoard, the checkpoint and the ONNX metadata say about the guarantee."""
        return {
            "mechanism": "DP-SGD (Opacus), Poisson sampling of users",
            "unit": "user (all of a user's training events are one record)",
            "epsilon": round(self.epsilon_spent(), 4),
            "delta": self.delta,
            "target_epsilon": float(self.settings.epsilon),
            "accountant": self.settings.accountant,
            "noise_multiplier": self.plan["noise_multiplier"],
            "max_grad_norm": float(self.settings.max_grad_norm),
            "sample_rate": self.sample_rate,
            "users": self.n_users,
            "steps": self.steps_taken(),
            "planned_steps": self.plan["planned_steps"],
            "planned_epochs": self.plan["planned_epochs"],
            "events_per_user": self.settings.events_per_user,
            "windows_per_user": self.settings.windows_per_user,
            "not_protected": NOT_PROTECTED,
        }

    def state(self) -> dict[str, Any]:
        """The accountant's history, for a checkpoint (plain lists: loadable with weights_only)."""
        return {"history": [[float(s), float(q), int(n)] for s, q, n in self.accountant.history]}

    def load_state(self, state: dict[str, Any]) -> None:
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in state.get("history", [])]


#: what the guarantee does not cover, stated wherever the guarantee is (README, results, metadata)
NOT_PROTECTED = ("item popularity shipped for cold start and evaluation, the item vocabulary (which items occur "
                 "in the log) and the user vocabulary sidecar (who is in it) are computed from raw data without "
                 "noise; validation events are only watched (no early stopping or checkpoint choice under DP)")

NO_PRIVACY = {"mechanism": "none", "differential_privacy": False}
