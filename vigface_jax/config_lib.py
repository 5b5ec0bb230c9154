"""Pieces every config file shares: argument parsing, mesh, logical-axis rules, distributed init.

Lives in the package (not in `configs/`) so that config files load from any working directory.
"""

from __future__ import annotations

from ml_collections import config_dict

from vigface_jax import parallel


class ConfigError(ValueError):
  """The config cannot run: unknown task, missing required field, bad value.

  `vigface_jax.main` reports it as one line (exit status 2) without a traceback; tasks raise
  it for mistakes only they can detect (e.g. a dataset path their data source needs).
  """


def parse_arg(arg: str | None, **defaults) -> config_dict.ConfigDict:
  """Parses `variant` or `key=value,key=value` config arguments (big_vision style).

  A bare word sets the first default's key: `configs/preview.py:tiny` is `variant=tiny`.
  Values take the type of their default. Unknown keys are an error naming the accepted ones.
  """
  out = config_dict.ConfigDict(dict(defaults))
  if not arg:
    return out
  first = next(iter(defaults))
  for part in arg.split(","):
    key, sep, value = part.partition("=")
    if not sep:
      key, value = first, key
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; accepted: {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      value = value.lower() in ("1", "true", "yes")
    elif default is not None:
      value = type(default)(value)
    out[key] = value
  return out


def add_parallelism(config: config_dict.ConfigDict) -> None:
  """Adds mesh axes/shape, logical-axis rules and the multi-host initialisation mode."""
  config.mesh = config_dict.ConfigDict()
  config.mesh.axes = ("data", "fsdp", "model")  # named mesh axes
  config.mesh.shape = (-1, 1, 1)  # devices per axis; -1 = all the remaining devices
  # Logical axis name → mesh axes (first unused match wins; unknown names are replicated).
  config.sharding_rules = parallel.DEFAULT_RULES
  # 'auto': call jax.distributed.initialize() when the environment describes a multi-process
  # job (coordinator address, SLURM, Open MPI, TPU pod); 'always' / 'never' force it.
  config.distributed = "auto"
