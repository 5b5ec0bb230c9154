r"""Entry point: `python -m vigface_jax.main --config=configs/<task>.py[:arg] --workdir=DIR`.

Flags, logging and multi-host initialisation, then one call into the task named by
`config.task` (`tasks.run`). Any config field can be overridden with `--config.a.b=value`; a
misspelt field, an unknown task or a missing required field stops with a message that names
it. The resolved config is saved as `config.json` in the workdir.

Compiled programs are kept in a persistent compilation cache, so a rerun, a resumed job or
the next stage with the same shapes skips XLA's compile (the demo configs' train steps: 6–7 s
cold against under 1 s warm on a 2-core CPU, `benchmarks/run.py --only=compile`): JAX's own
`JAX_COMPILATION_CACHE_DIR` if set (empty: no cache), else `~/.cache/vigface_jax/xla`.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import vigface_jax
from vigface_jax import config_lib
from vigface_jax import metrics
from vigface_jax import parallel
from vigface_jax import preemption
from vigface_jax import tasks

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file: configs/<task>.py[:arg]; override fields with --config.a.b=v.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs, checkpoints and logs.")

ConfigError = config_lib.ConfigError
run = tasks.run  # `main.run(config, workdir)`: the same call from Python


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with config mistakes reported as one readable line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # config_flags wraps errors raised inside get_config in a traceback string; its last
    # line is the message. Unknown override fields arrive as a bare quoted key.
    lines = [l.strip() for l in str(e).replace("\\n", "\n").split("\n") if l.strip()]
    msg = lines[-1].strip("'\"") if lines else type(e).__name__
    if isinstance(e, (AttributeError, KeyError)):
      overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
      key = re.search(r"\w+", lines[0]) if lines else None
      hint = " ".join(lines[1:]).strip("\\'\" ")
      msg = (f"unknown config field '{key.group(0) if key else '?'}'"
             f"{': ' + hint if hint else ''} (overrides given: {', '.join(overrides) or 'none'})")
    sys.stderr.write(f"vigface_jax: bad flag or config: {msg}\n"
                     "Usage: python -m vigface_jax.main --config=configs/<task>.py[:arg] "
                     "--workdir=DIR [--config.a.b=value ...]\n")
    sys.exit(2)


def compilation_cache_dir(environ: dict[str, str] | None = None) -> str | None:
  """Where compiled programs persist: JAX_COMPILATION_CACHE_DIR if set ('' = nowhere), else
  the user cache directory."""
  environ = os.environ if environ is None else environ
  if "JAX_COMPILATION_CACHE_DIR" in environ:
    return environ["JAX_COMPILATION_CACHE_DIR"] or None
  return os.path.join(os.path.expanduser("~"), ".cache", "vigface_jax", "xla")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("both --config and --workdir are required")
  config = _CONFIG.value
  # Must precede anything that creates a JAX backend.
  if config.get("task") in vigface_jax.TRAINING_TASKS:
    vigface_jax.add_cpu_xla_flags()
  parallel.maybe_initialize_distributed(config.distributed)
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # when set, JAX reads it itself
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_compilation_cache_dir", compilation_cache_dir())
  try:
    with preemption.watch():
      tasks.run(config, _WORKDIR.value)
  except preemption.Preempted as e:
    logging.warning("%s", e)
    sys.stderr.write(f"vigface_jax: {e}\n")
    sys.exit(preemption.EXIT_PREEMPTED)
  except metrics.StorageError as e:  # disk full, unwritable workdir: exit 74 (EX_IOERR)
    logging.error("%s", e)
    sys.stderr.write(f"vigface_jax: {e}\n")
    sys.exit(74)
  except ConfigError as e:
    logging.error("%s", e)
    sys.stderr.write(f"vigface_jax: {e}\n")
    sys.exit(2)
  except RuntimeError as e:
    # Training that diverged stops with a message saying which checkpoint is kept.
    if type(e).__name__ != "TrainingDiverged":
      raise
    logging.error("%s", e)
    sys.stderr.write(f"vigface_jax: {e}\n")
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
