"""Backbone checkpoints shared by the converter and the trainer, and an embedding function.

A backbone directory holds

* `backbone.json`: `{"format": "vigface_jax.backbone/1", "arch": "r50",
  "embed_dim": 512, "input_size": 112, ...extra}`, written by process 0 only;
* `backbone/`: an orbax checkpoint of the model's `nnx.Param` and
  `nnx.BatchStat` variables as a pure nested dict (`nnx.to_pure_dict`).

`save_backbone` writes one (from `python -m vigface_jax.convert insightface`
or the stage-1 trainer's export), `load_backbone` rebuilds the `IResNet` in
eval mode and `load_embedder` returns a jitted `uint8 [b, H, W, 3] RGB ->
float32 [b, embed_dim]` numpy function. Both loaders accept the backbone
directory itself or a training workdir holding it as `export/`.
"""

from __future__ import annotations

from collections.abc import Callable
import json
import os
from typing import Any

from flax import nnx
import jax
import numpy as np
import orbax.checkpoint as ocp

from vigface_jax import ops
from vigface_jax import parallel
from vigface_jax.models import iresnet

FORMAT = "vigface_jax.backbone/1"
INFO_FILE = "backbone.json"
STATE_DIR = "backbone"
# Where a training workdir keeps its exported backbone.
EXPORT_SUBDIR = "export"

_VARIABLES = (nnx.Param, nnx.BatchStat)


def _to_host(x: Any) -> Any:
  # Fully addressable arrays become numpy; global (multi-process) arrays stay jax
  # arrays so that orbax writes each process's shards.
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return x
  return np.asarray(x)


def save_backbone(directory: str | os.PathLike[str], model: iresnet.IResNet, *, arch: str,
                  embed_dim: int, input_size: int = 112, extra: dict[str, Any] | None = None,
                  force: bool = False) -> str:
  """Writes `model` as a backbone checkpoint (see the module docstring).

  Call it on every process: orbax coordinates the array write, process 0
  alone writes `backbone.json`.

  Args:
    directory: output directory (created if needed).
    model: the `IResNet` to save (its `Param`s and `BatchStat`s).
    arch: its `iresnet.VARIANTS` name.
    embed_dim: its embedding size.
    input_size: its square input side.
    extra: more JSON-serialisable entries for `backbone.json` (source file,
      training step, ...); may not override the fields above.
    force: overwrite an existing checkpoint in `directory`.

  Returns:
    The absolute directory path.

  Raises:
    ValueError: if `directory` already holds a backbone and `force` is False,
      or `extra` collides with a reserved field.
  """
  directory = os.path.abspath(os.fspath(directory))
  info = {"format": FORMAT, "arch": arch, "embed_dim": int(embed_dim),
          "input_size": int(input_size)}
  clash = sorted(set(extra or {}) & set(info))
  if clash:
    raise ValueError(f"save_backbone: extra may not override {clash}")
  info.update(extra or {})
  state_path = os.path.join(directory, STATE_DIR)
  info_path = os.path.join(directory, INFO_FILE)
  if not force and (os.path.exists(state_path) or os.path.exists(info_path)):
    raise ValueError(f"{directory} already holds a backbone checkpoint; pass force=True "
                     "(--force) to overwrite it")
  pure = nnx.to_pure_dict(nnx.state(model, _VARIABLES))
  abstract = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(pure)
              if isinstance(x, jax.ShapeDtypeStruct)]
  if abstract:
    raise ValueError(f"save_backbone: model variables {abstract[:5]} have no values "
                     "(an abstract model that was not fully loaded)")
  pure = jax.tree.map(_to_host, pure)
  os.makedirs(directory, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(state_path, pure, force=force)
  checkpointer.wait_until_finished()
  if parallel.is_main_process():
    tmp = info_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(info, f, indent=2, sort_keys=True)
      f.write("\n")
    os.replace(tmp, info_path)
  return directory


def _find_info(directory: str) -> str:
  for candidate in (directory, os.path.join(directory, EXPORT_SUBDIR)):
    if os.path.isfile(os.path.join(candidate, INFO_FILE)):
      return candidate
  raise ValueError(f"{directory}: no {INFO_FILE} here or in {EXPORT_SUBDIR}/; point to a "
                   "directory written by save_backbone (e.g. `python -m vigface_jax.convert "
                   "insightface --out=DIR`) or a training workdir with an export/")


def read_info(directory: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
  """(backbone directory, validated `backbone.json` contents) of `directory`.

  Raises:
    ValueError: naming the file, if it is missing, not JSON or not this format.
  """
  root = _find_info(os.path.abspath(os.fspath(directory)))
  path = os.path.join(root, INFO_FILE)
  try:
    with open(path) as f:
      info = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: unreadable backbone description ({e}); re-export the "
                     "backbone") from None
  if not isinstance(info, dict) or info.get("format") != FORMAT:
    found = info.get("format") if isinstance(info, dict) else type(info).__name__
    raise ValueError(f"{path}: format {found!r} is not {FORMAT!r}; re-export the backbone")
  problems = []
  if info.get("arch") not in iresnet.VARIANTS:
    problems.append(f"arch {info.get('arch')!r} (known: {sorted(iresnet.VARIANTS)})")
  for key in ("embed_dim", "input_size"):
    if not isinstance(info.get(key), int) or info[key] <= 0:
      problems.append(f"{key} {info.get(key)!r}")
  if problems:
    raise ValueError(f"{path}: invalid {', '.join(problems)}; fix or re-export the backbone")
  return root, info


def placeholder(x: Any) -> Any:
  """A concrete stand-in for an abstract (`jax.ShapeDtypeStruct`) leaf; other leaves as is.

  Zeros (numpy, so nothing compiles) for arrays, `jax.random.key(0)` for PRNG keys: for
  state that is overwritten next or never used in eval mode (dropout RNGs).
  """
  if not isinstance(x, jax.ShapeDtypeStruct):
    return x
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    key = jax.random.key(0)
    return jax.random.split(key, x.shape) if x.shape else key
  return np.zeros(x.shape, x.dtype)


def load_backbone(directory: str | os.PathLike[str]) -> tuple[iresnet.IResNet, dict[str, Any]]:
  """Rebuilds the backbone saved by `save_backbone`, in eval mode.

  Args:
    directory: the backbone directory, or a training workdir with `export/`.

  Returns:
    (model, the `backbone.json` contents plus "directory").

  Raises:
    ValueError: naming the file, for a missing/invalid `backbone.json` or a
      checkpoint whose arrays do not fit the described model.
  """
  root, info = read_info(directory)
  state_path = os.path.join(root, STATE_DIR)
  if not os.path.isdir(state_path):
    raise ValueError(f"{state_path}: missing backbone weights; re-export the backbone")
  arch, embed_dim, input_size = info["arch"], info["embed_dim"], info["input_size"]
  abstract = nnx.eval_shape(lambda: iresnet.IResNet(
      arch, embed_dim=embed_dim, input_size=input_size, rngs=nnx.Rngs(0)))
  graphdef, variables, rest = nnx.split(abstract, _VARIABLES, ...)
  target = nnx.to_pure_dict(variables)
  checkpointer = ocp.StandardCheckpointer()
  try:
    restored = checkpointer.restore(state_path, target)
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{state_path}: weights do not match a {arch} backbone with embed_dim "
                     f"{embed_dim}, input_size {input_size} as {INFO_FILE} says ({str(e)[:500]}); "
                     "re-export the backbone") from None
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    if tuple(got.shape) != tuple(want.shape):
      raise ValueError(f"{state_path}: array of shape {tuple(got.shape)} where the {arch} "
                       f"backbone needs {tuple(want.shape)}; re-export the backbone")
  nnx.replace_by_pure_dict(variables, restored)
  rest = jax.tree.map(placeholder, rest)
  model = nnx.merge(graphdef, variables, rest)
  model.eval()
  return model, dict(info, directory=root)


def load_embedder(directory: str | os.PathLike[str], batch_size: int | None = None
                  ) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]:
  """A jitted embedding function of the backbone saved in `directory`.

  Args:
    directory: the backbone directory, or a training workdir with `export/`.
    batch_size: if set, inputs are embedded in chunks of this size (the last
      chunk padded), so one compiled shape serves any number of images.

  Returns:
    (embed_fn, info): `embed_fn(images)` takes aligned uint8 `[b, 112, 112, 3]` RGB faces
    (resized to `info["input_size"]` as in training when that differs, see
    `iresnet.prepare`) and returns float32 `[b, embed_dim]` numpy embeddings (not
    L2-normalised); info as from `load_backbone`.
  """
  model, info = load_backbone(directory)
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, images):
    return nnx.merge(graphdef, state)(iresnet.prepare(images, info["input_size"]))

  side = 112  # the ArcFace-aligned crop every source and .bin pack holds

  def embed_fn(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (side, side, 3):
      raise ValueError(f"embed_fn expects uint8 [batch, {side}, {side}, 3] RGB, got "
                       f"{images.dtype} {images.shape}")
    if not batch_size:
      return np.asarray(forward(state, images), np.float32)
    if not images.shape[0]:
      return np.zeros((0, info["embed_dim"]), np.float32)
    return ops.map_batches(lambda chunk: np.asarray(forward(state, chunk), np.float32),
                           [images], batch_size)

  return embed_fn, info
