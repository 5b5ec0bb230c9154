"""Finished stage-1 and stage-2 runs, read back for generation and auditing.

A stage-1 workdir (`configs/fr.py`) gives its `config.json` (which data it trained on),
`prototypes.npz` (real and virtual class-centre rows) and `export/` backbone; a stage-2 workdir
(`configs/dit.py`) its `config.json` and latest checkpoint, restored into the stage-2 network
(EMA parameters when the run kept them) on the generator's mesh. Every missing or mismatched
piece is a `ConfigError` naming the workdir field and the command that produces it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from flax import nnx
import jax
from jax.sharding import Mesh
import ml_collections
import numpy as np

from vigface_jax import config_lib
from vigface_jax import parallel
from vigface_jax.diffusion import schedules
from vigface_jax.evaluate import embed as embed_lib
from vigface_jax.models import stage2
from vigface_jax.train import checkpoint as checkpoint_lib
from vigface_jax.train import optim
from vigface_jax.train import state as state_lib

ConfigError = config_lib.ConfigError
STAGE1_COMMAND = "python -m vigface_jax.main --config=configs/fr.py:demo --workdir=<stage-1 dir>"
STAGE2_COMMAND = ("python -m vigface_jax.main --config=configs/dit.py:demo "
                  "--config.stage1.workdir=<stage-1 dir> --workdir=<stage-2 dir>")


def read_run_config(workdir: str, field: str, command: str) -> ml_collections.ConfigDict:
  """The `config.json` a finished run wrote into `workdir` (named `field` in errors)."""
  if not workdir:
    raise ConfigError(f"{field} is not set: pass --config.{field}=<dir> (a finished run of "
                      f"`{command}`)")
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      raw = json.load(f)
  except FileNotFoundError:
    raise ConfigError(f"{field}={workdir}: no config.json there; point it to a finished run "
                      f"of `{command}`") from None
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"{field}={workdir}: config.json is unreadable ({e}); rerun "
                      f"`{command}` or fix the file") from None
  return ml_collections.ConfigDict(raw)


@dataclasses.dataclass
class Stage1:
  """A finished stage-1 run."""

  workdir: str
  config: ml_collections.ConfigDict
  info: dict[str, Any]  # backbone.json of its export
  real: np.ndarray  # [n, d] unit rows
  virtual: np.ndarray  # [k, d] unit rows


def load_stage1(workdir: str, field: str = "stage1.workdir") -> Stage1:
  config = read_run_config(workdir, field, STAGE1_COMMAND)
  if config.get("task") != "fr":
    raise ConfigError(f"{field}={workdir} is a {config.get('task')!r} run, not stage 1 "
                      f"(`{STAGE1_COMMAND}`)")
  try:
    _, info = embed_lib.read_info(workdir)
  except ValueError as e:
    raise ConfigError(f"{field}={workdir}: {e}") from None
  npz = os.path.join(workdir, "prototypes.npz")
  if not os.path.exists(npz):
    raise ConfigError(f"{npz} is missing: stage 1 writes it when it finishes "
                      f"(`{STAGE1_COMMAND}`)")
  with np.load(npz) as f:
    real, virtual = np.asarray(f["real"], np.float32), np.asarray(f["virtual"], np.float32)
  return Stage1(workdir=os.path.abspath(workdir), config=config, info=info, real=real,
                virtual=virtual)


@dataclasses.dataclass
class Stage2Run:
  """A finished stage-2 run, restored for sampling."""

  workdir: str
  config: ml_collections.ConfigDict
  graphdef: nnx.GraphDef
  params: Any  # the EMA (or raw) DiT parameters, sharded as trained
  rest: Any
  shardings: state_lib.TrainState
  schedule: schedules.Schedule
  step: int


def load_stage2(workdir: str, s1: Stage1, mesh: Mesh,
                rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
                field: str = "stage2.workdir", weights: str = "ema") -> Stage2Run:
  """Restores the latest checkpoint of a stage-2 run trained on `s1`'s real rows; `weights`
  'ema' draws with its EMA (as its evaluators; the raw weights if it kept none), 'raw' with the
  last step's own weights.

  Raises:
    ConfigError: no such run or checkpoint, or the run was trained on other stage-1 rows
      (its row table differs from `s1.real`): naming both workdirs.
  """
  config = read_run_config(workdir, field, STAGE2_COMMAND)
  if config.get("task") != "dit":
    raise ConfigError(f"{field}={workdir} is a {config.get('task')!r} run, not stage 2 "
                      f"(`{STAGE2_COMMAND}`)")
  n = s1.real.shape[0]
  create = stage2.builder(config.model, s1.info, n)
  tx, _ = optim.make_optimizer(config.optim, int(config.train.num_steps))
  ema = float(config.train.ema_decay) > 0
  _, setup = state_lib.create_state(create, tx, mesh, seed=int(config.train.seed), rules=rules,
                                    ema=ema, trainable=stage2.TRAINABLE)
  ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise ConfigError(f"{field}={workdir} has no checkpoint under checkpoints/: finish "
                        f"`{STAGE2_COMMAND}` first")
    try:
      state = ckpt.restore(step, setup.abstract)
    except ValueError as e:
      raise ConfigError(f"{field}={workdir}: its checkpoint does not fit a stage-2 model "
                        f"built from its config.json and {s1.workdir} ({str(e)[:300]}); was "
                        "it trained on this stage 1?") from None
  finally:
    ckpt.close()
  rows = np.asarray(jax.device_get(state.rest["rows"][...]), np.float32)
  if rows.shape != s1.real.shape or not np.allclose(rows, s1.real, atol=1e-5):
    trained_on = (config.get("stage1") or {}).get("workdir")
    raise ConfigError(
        f"stage2.workdir={workdir} was trained on other stage-1 rows (its config names "
        f"stage1.workdir={trained_on}) than stage1.workdir={s1.workdir}: generate with the "
        "stage 1 the DiT was trained on, or retrain stage 2 on this one")
  schedule = schedules.from_config(config.diffusion)
  return Stage2Run(workdir=os.path.abspath(workdir), config=config, graphdef=setup.graphdef,
                   params=state.params if weights == "raw" else state_lib.eval_params(state),
                   rest=state.rest,
                   shardings=setup.shardings, schedule=schedule, step=int(step))

