"""Optimizers and learning-rate schedules from a config's `optim` block.

The fields and their defaults are declared by `config_lib.optim_config` (every task's config
uses it); `validate` checks them, `make_optimizer` builds `(tx, schedule)`.
"""

from __future__ import annotations

from typing import Any

import optax

from vigface_jax import config_lib

_NAMES = ("sgd", "adamw")
_SCHEDULES = ("constant", "cosine", "step")


def validate(optim: config_lib.Fields) -> None:
  """ConfigError naming the field unless every `optim.*` field is valid."""
  optim.choice("name", _NAMES)
  optim.float("lr", above=0.0)
  optim.float("momentum", 0.0, most=1.0)
  optim.bool("nesterov")
  optim.float("b1", 0.0, most=1.0)
  optim.float("b2", 0.0, most=1.0)
  optim.float("eps", above=0.0)
  optim.float("weight_decay", 0.0)
  optim.choice("schedule", _SCHEDULES)
  optim.int("warmup_steps", 0)
  optim.numbers("decay_steps", int)
  optim.float("decay_factor", above=0.0)
  optim.float("end_lr_factor", 0.0)
  optim.float("grad_clip_norm", 0.0)


def make_schedule(optim: Any, total_steps: int) -> optax.Schedule:
  """Warm-up followed by a constant, cosine or step schedule over `total_steps`."""
  lr = float(optim.lr)
  warmup = int(optim.warmup_steps)
  kind = optim.schedule
  if kind not in _SCHEDULES:
    raise ValueError(f"optim.schedule={kind!r} is not one of {_SCHEDULES}")
  if warmup < 0 or total_steps <= 0:
    raise ValueError(f"optim.warmup_steps={warmup} and train.num_steps={total_steps} must be "
                     "non-negative and positive")
  rest = max(total_steps - warmup, 1)
  if kind == "constant":
    after = optax.constant_schedule(lr)
  elif kind == "cosine":
    after = optax.cosine_decay_schedule(lr, rest, alpha=float(optim.end_lr_factor))
  else:
    boundaries = {int(s) - warmup: float(optim.decay_factor)
                  for s in optim.decay_steps if int(s) > warmup}
    after = optax.piecewise_constant_schedule(lr, boundaries)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(optim: Any, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`(tx, schedule)` from `config.optim` (see the module docstring for the fields)."""
  name = optim.name
  if name not in _NAMES:
    raise ValueError(f"optim.name={name!r} is not one of {_NAMES}")
  schedule = make_schedule(optim, total_steps)
  parts = []
  clip = float(optim.grad_clip_norm)
  if clip > 0:
    parts.append(optax.clip_by_global_norm(clip))
  wd = float(optim.weight_decay)
  if name == "sgd":
    if wd:
      parts.append(optax.add_decayed_weights(wd))  # L2 added to the gradient, as torch SGD
    parts.append(optax.sgd(schedule, momentum=float(optim.momentum) or None,
                           nesterov=bool(optim.nesterov)))
  else:
    parts.append(optax.adamw(schedule, b1=float(optim.b1),
                             b2=float(optim.b2), eps=float(optim.eps),
                             weight_decay=wd))
  return optax.chain(*parts), schedule
