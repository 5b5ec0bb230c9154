"""Pieces every config file shares: argument parsing, mesh, logical-axis rules, distributed init.

Lives in the package (not in `configs/`) so that config files load from any working directory.
"""

from __future__ import annotations

import builtins
import math
import re
from collections.abc import Sequence
from typing import Any

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


def add_parallelism(config: config_dict.ConfigDict,
                    rules: parallel.LogicalRules = parallel.DEFAULT_RULES) -> None:
  """Adds mesh axes/shape, logical-axis `rules` and the multi-host initialisation mode."""
  config.mesh = config_dict.ConfigDict()
  config.mesh.axes = ("data", "fsdp", "model")  # named mesh axes
  config.mesh.shape = (-1, 1, 1)  # devices per axis; -1 = all the remaining devices
  # Logical axis name → mesh axes (first unused match wins; unknown names are replicated).
  config.sharding_rules = rules
  # 'auto': call jax.distributed.initialize() when the environment describes a multi-process
  # job (coordinator address, SLURM, Open MPI, TPU pod); 'always' / 'never' force it.
  config.distributed = "auto"
  # True: lower and compile the training step for the configured mesh and print its memory per
  # device, FLOPs per step and the sharding of the largest arrays, without training, without
  # initialising weights or reading data (train/compile_only.py; stage 1 and stage 2 only;
  # stage 2's also compiles stage 3's sampler for its model).
  # Fake the target's device count on CPU with
  # XLA_FLAGS=--xla_force_host_platform_device_count=N.
  config.dry_run = False
  # With dry_run: compile ahead of time for this Cloud TPU slice instead of the local devices,
  # on a host without TPUs, through libtpu's topology description (`pip install -e ".[tpu]"`):
  # '<generation>:<chips>' such as 'v5e:2x4', 'v5p:2x2x2', 'v4:2x2x2', 'v6e:4x4'. The mesh
  # then spans the slice's chips and the figures are the TPU compiler's. None: local devices.
  config.dry_run_topology = config_dict.placeholder(str)


class Fields:
  """Reads and checks the fields of one config section; errors name the dotted field.

  Every task validates its whole config once, at its start, through these readers (one call
  per declared field), so a wrong value stops the run before anything is built, with a
  `ConfigError` that names the field and says what it must be.
  """

  def __init__(self, section: Any, prefix: str):
    self.section, self.prefix = section, prefix

  def _path(self, key: str) -> str:
    return f"{self.prefix}.{key}" if self.prefix else key

  def fail(self, key: str, must: str, value: Any) -> None:
    raise ConfigError(f"{self._path(key)} must be {must}, got {value!r}")

  def get(self, key: str) -> Any:
    """The raw value; ConfigError if the config does not declare it."""
    try:
      return self.section[key]
    except KeyError:
      raise ConfigError(f"config field '{self._path(key)}' is missing: the config file must "
                        "define it") from None

  def sub(self, key: str) -> "Fields":
    """The readers of a nested section."""
    return Fields(self.get(key), self._path(key))

  def int(self, key: str, least: int | None = None, *, most: int | None = None,
          optional: bool = False) -> int | None:
    value = self.get(key)
    if value is None and optional:
      return None
    if isinstance(value, bool) or not isinstance(value, int) or (
        least is not None and value < least) or (most is not None and value > most):
      bounds = (f" ≥ {least}" if least is not None else "") + (
          f"{',' if least is not None else ''} ≤ {most}" if most is not None else "")
      self.fail(key, "an integer" + bounds, value)
    return value

  def float(self, key: str, least: float | None = None, *, above: float | None = None,
            most: float | None = None, optional: bool = False) -> float | None:
    value = self.get(key)
    if value is None and optional:
      return None
    try:
      x = float(value) if not isinstance(value, (bool, str)) else math.nan
    except (TypeError, ValueError):
      x = math.nan
    ok = math.isfinite(x) and (least is None or x >= least) and (above is None or x > above) \
        and (most is None or x <= most)
    if not ok:
      bounds = [f"≥ {least}" if least is not None else "", f"> {above}" if above is not None
                else "", f"≤ {most}" if most is not None else ""]
      self.fail(key, " ".join(["a finite number"] + [b for b in bounds if b]), value)
    return x

  def bool(self, key: str) -> bool:
    value = self.get(key)
    if not isinstance(value, bool):
      self.fail(key, "true or false", value)
    return value

  def choice(self, key: str, choices: Sequence[Any]) -> Any:
    value = self.get(key)
    if value not in choices:
      self.fail(key, f"one of {list(choices)}", value)
    return value

  def str(self, key: str, *, optional: bool = False) -> str | None:
    value = self.get(key)
    if (value is None and optional) or isinstance(value, str):
      return value
    self.fail(key, "a string" + (" or None" if optional else ""), value)

  def numbers(self, key: str, kind: type = builtins.float, *, length: int | None = None,
              optional: bool = False) -> tuple[Any, ...] | None:
    """A sequence of numbers (e.g. `(6.0, 16.0)`), as a tuple of `kind`."""
    value = self.get(key)
    if value is None and optional:
      return None
    try:
      out = tuple(kind(v) for v in value)
      ok = all(not isinstance(v, (bool, str)) for v in value) and all(
          math.isfinite(v) for v in out) and (length is None or len(out) == length)
    except (TypeError, ValueError):
      ok = False
    if not ok:
      self.fail(key, f"a sequence of {length or 'any number of'} finite numbers"
                + (" or None" if optional else ""), value)
    return out


def _section(fields: dict[str, Any], overrides: dict[str, Any], name: str
             ) -> config_dict.ConfigDict:
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ValueError(f"config_lib: {name} has no field(s) {unknown}")
  return config_dict.ConfigDict({**fields, **overrides})


def data_config(**overrides: Any) -> config_dict.ConfigDict:
  """`config.data`: every field a source or the input pipeline reads, with its default.

  source               which source (`data.pipeline.SOURCES`): procedural | recordio |
                       imagefolder | arrayrecord
  path                 dataset location (RecordIO .rec, image folder, ArrayRecord dir); the
                       file sources need it
  seed                 shuffle/augmentation seed; for procedural faces the world seed too
  global_batch_size    examples per step over all processes
  shuffle              shuffle records every epoch
  num_epochs           passes over the data (None: endless)
  flip_prob            horizontal-flip probability (landmarks flipped with left/right swapped)
  worker_count         grain worker processes per host (0: in-process)
  worker_buffer_size   batches prepared ahead per worker
  read_threads         record-reading threads per process (0: grain's default)
  num_identities, images_per_identity, identity_offset, cache   procedural source: how many
                       people, images each, the first identity id, render once into memory
  label_file, bgr_to_rgb, decode   recordio: labels from a text file instead of the headers,
                       swap channels of packs written from BGR arrays, decode images (False:
                       raw encoded bytes)
  landmarks_file, align           imagefolder: five-point landmark file, align the images to
                       the ArcFace template with them
  split                arrayrecord: which split's shards
  on_error             recordio / imagefolder: 'raise' on a corrupt record, or 'skip' it
  """
  return _section({
      "source": "procedural", "path": config_dict.placeholder(str), "seed": 0,
      "global_batch_size": 64, "shuffle": True, "num_epochs": config_dict.placeholder(int),
      "flip_prob": 0.5, "worker_count": 0, "worker_buffer_size": 2, "read_threads": 0,
      "num_identities": 800, "images_per_identity": 24, "identity_offset": 0, "cache": False,
      "label_file": config_dict.placeholder(str), "bgr_to_rgb": False, "decode": True,
      "landmarks_file": config_dict.placeholder(str), "align": False, "split": "train",
      "on_error": "raise",
  }, overrides, "data")


def optim_config(**overrides: Any) -> config_dict.ConfigDict:
  """`config.optim` (`train/optim.py`): every optimizer and schedule field, with its default.

  name                 'sgd' (momentum, L2 weight decay as torch.optim.SGD) or 'adamw'
  lr                   peak learning rate (after warm-up)
  momentum, nesterov   SGD momentum and Nesterov's variant
  b1, b2, eps          AdamW moment decays and epsilon
  weight_decay         L2 (SGD) or decoupled (AdamW) weight decay
  schedule             'constant', 'cosine' or 'step', after `warmup_steps` of linear warm-up
  decay_steps, decay_factor   'step': multiply the rate by decay_factor at these steps
  end_lr_factor        'cosine': floor as a fraction of lr
  grad_clip_norm       clip the global gradient norm to this (0: no clipping)
  """
  return _section({
      "name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False, "b1": 0.9, "b2": 0.999,
      "eps": 1e-8, "weight_decay": 0.0, "schedule": "constant", "warmup_steps": 0,
      "decay_steps": (), "decay_factor": 0.1, "end_lr_factor": 0.0, "grad_clip_norm": 0.0,
  }, overrides, "optim")


def train_config(**overrides: Any) -> config_dict.ConfigDict:
  """`config.train` (`train/loop.py`): the shared training loop's fields, with defaults.

  num_steps            optimizer steps in all
  seed                 initialisation and per-step RNG seed
  log_every            steps between metric records
  checkpoint_every     steps between checkpoints (the last step is always saved; 0: only it)
  keep_checkpoints     checkpoints kept
  async_checkpoint     save in the background
  ema_decay, ema_warmup   EMA of the parameters (0: off); warm-up min(decay, (1+t)/(10+t))
  profile_steps        (start, stop) steps traced by jax.profiler into workdir/profile; ()
  peak_tflops_per_device  peak TFLOP/s for the MFU figure (0: from the device kind; none on
                       CPU)
  skip_nonfinite       non-finite steps in a row that are skipped (no update; counted in
                       `train/skipped_steps`) before training stops; 0: stop at the first
  finite_check_every   also read the steps' non-finite flags every N steps, one step late (1:
                       a NaN stops the run a step later); 0: only at log steps, before a
                       checkpoint, on a stop and at the end, so the host never waits on the
                       device between them (a NaN stops the run at the next of those)
  """
  return _section({
      "num_steps": 1000, "seed": 0, "log_every": 50, "checkpoint_every": 1000,
      "keep_checkpoints": 3, "async_checkpoint": True, "ema_decay": 0.0, "ema_warmup": False,
      "profile_steps": (), "peak_tflops_per_device": 0.0, "skip_nonfinite": 0,
      "finite_check_every": 0,
  }, overrides, "train")


def audit_config(**overrides: Any) -> config_dict.ConfigDict:
  """`config.audit` (`generate/audit.py`, `generate/audit_task.py`): the privacy audit.

  encoders             independent FR encoders: backbone directories (`evaluate/embed.py`:
                       our exports, e.g. a `configs/fr.py:auditor` workdir, or converted
                       insightface models); the stage-1 network is always audited as well
  quantile             flag an identity whose statistic exceeds this quantile of the held-out
                       calibration people's (unrelated real people are flagged at 1 − quantile)
  fmrs                 false-match rates of the image-level thresholds (real impostor pairs);
                       the first is the one the image-level verdict tests
  max_impostor_pairs   impostor pairs sampled for those thresholds
  min_control          leak-control detection rate (class level) an audit needs to be
                       conclusive; a non-conclusive audit is not a pass
  drop_flagged         leave identities flagged under any encoder out of the export
  query_chunk          generated images per search call (search.nearest)
  heldout_ids, heldout_images   people outside the training set (procedural data: fresh
                       identities, images each; the first half calibrates, the second measures)
  heldout_offset       their first procedural identity id (disjoint from every other use)
  heldout              real data: a data section (`data_config` fields) naming the gallery of
                       people not in the training data (None with procedural data)
  leak_ids             leak-control identities: drawn from real rows (generate) or new images
                       of training people (audit task), put through the same audit
  """
  return _section({
      "encoders": (), "quantile": 0.99, "fmrs": (1e-3, 1e-4), "max_impostor_pairs": 2_000_000,
      "min_control": 0.95, "drop_flagged": True, "query_chunk": 4096, "heldout_ids": 400,
      "heldout_images": 20, "heldout_offset": 3_000_000,
      "heldout": config_dict.placeholder(config_dict.ConfigDict), "leak_ids": 40,
  }, overrides, "audit")


def validate_parallelism(config: Any, *, dry_run_task: bool = False) -> None:
  """The fields `add_parallelism` declares (`dry_run` may be True only for a task that has a
  compile-only dry run, `dry_run_task`)."""
  f = Fields(config, "")
  mesh = f.sub("mesh")
  axes = mesh.get("axes")
  if not (isinstance(axes, (tuple, list)) and all(isinstance(a, str) for a in axes)):
    mesh.fail("axes", "a tuple of mesh axis names", axes)
  mesh.numbers("shape", int, length=len(axes))
  rules = f.get("sharding_rules")
  if not isinstance(rules, (tuple, list)):
    f.fail("sharding_rules", "a sequence of (logical name, mesh axes) pairs", rules)
  f.choice("distributed", ("auto", "always", "never"))
  if f.bool("dry_run") and not dry_run_task:
    f.fail("dry_run", "False for this task (compile-only dry runs are for the training tasks, "
           "configs/fr.py and configs/dit.py)", True)
  topology = f.str("dry_run_topology", optional=True)
  if topology is not None:
    if not f.get("dry_run"):
      f.fail("dry_run_topology", "None unless dry_run=True (it names the TPU slice a "
             "compile-only dry run compiles for)", topology)
    if not re.fullmatch(r"v[0-9]+[a-z]*(lite)?:[0-9]+(x[0-9]+){1,2}", topology):
      f.fail("dry_run_topology", "a Cloud TPU slice '<generation>:<chips>' such as 'v5e:2x4' "
             "or 'v5p:2x2x2'", topology)
