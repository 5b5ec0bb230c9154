"""Optimizers and learning-rate schedules from a config's `optim` block.

Fields of `config.optim` (all trainers):
  name: 'sgd' (momentum; weight decay added to the gradient as L2, like arcface_torch's
    `torch.optim.SGD(weight_decay=...)`) or 'adamw' (decoupled weight decay).
  lr: peak learning rate (after warm-up).
  momentum: SGD momentum (default 0.9); nesterov: bool (default False).
  b1, b2, eps: AdamW moments (defaults 0.9, 0.999, 1e-8).
  weight_decay: L2 (SGD) or decoupled (AdamW) weight decay.
  schedule: 'constant', 'cosine' or 'step'.
  warmup_steps: linear warm-up from 0 to `lr`.
  decay_steps: for 'step', the steps at which the rate is multiplied by `decay_factor`.
  decay_factor: step decay factor (default 0.1).
  end_lr_factor: cosine floor as a fraction of `lr` (default 0).
  grad_clip_norm: clip the global gradient norm to this (0: no clipping).
"""

from __future__ import annotations

from typing import Any

import optax

_NAMES = ("sgd", "adamw")
_SCHEDULES = ("constant", "cosine", "step")


def make_schedule(optim: Any, total_steps: int) -> optax.Schedule:
  """Warm-up followed by a constant, cosine or step schedule over `total_steps`."""
  lr = float(optim.lr)
  warmup = int(optim.get("warmup_steps", 0))
  kind = optim.get("schedule", "constant")
  if kind not in _SCHEDULES:
    raise ValueError(f"optim.schedule={kind!r} is not one of {_SCHEDULES}")
  if warmup < 0 or total_steps <= 0:
    raise ValueError(f"optim.warmup_steps={warmup} and train.num_steps={total_steps} must be "
                     "non-negative and positive")
  rest = max(total_steps - warmup, 1)
  if kind == "constant":
    after = optax.constant_schedule(lr)
  elif kind == "cosine":
    after = optax.cosine_decay_schedule(lr, rest, alpha=float(optim.get("end_lr_factor", 0.0)))
  else:
    boundaries = {int(s) - warmup: float(optim.get("decay_factor", 0.1))
                  for s in optim.get("decay_steps", ()) if int(s) > warmup}
    after = optax.piecewise_constant_schedule(lr, boundaries)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(optim: Any, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`(tx, schedule)` from `config.optim` (see the module docstring for the fields)."""
  name = optim.get("name")
  if name not in _NAMES:
    raise ValueError(f"optim.name={name!r} is not one of {_NAMES}")
  schedule = make_schedule(optim, total_steps)
  parts = []
  clip = float(optim.get("grad_clip_norm", 0.0))
  if clip > 0:
    parts.append(optax.clip_by_global_norm(clip))
  wd = float(optim.get("weight_decay", 0.0))
  if name == "sgd":
    if wd:
      parts.append(optax.add_decayed_weights(wd))  # L2 added to the gradient, as torch SGD
    parts.append(optax.sgd(schedule, momentum=float(optim.get("momentum", 0.9)) or None,
                           nesterov=bool(optim.get("nesterov", False))))
  else:
    parts.append(optax.adamw(schedule, b1=float(optim.get("b1", 0.9)),
                             b2=float(optim.get("b2", 0.999)), eps=float(optim.get("eps", 1e-8)),
                             weight_decay=wd))
  return optax.chain(*parts), schedule
