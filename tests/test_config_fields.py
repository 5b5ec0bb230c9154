"""Every config field is declared, read by its task's `validate`, and settable from the command
line; nothing the code reads is undeclared (tests/config_fields.py records the lookups)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

import config_fields
from vigface_jax import config_lib
from vigface_jax import tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = [("fr", "default"), ("fr", "demo"), ("fr", "tiny"), ("dit", "default"),
            ("dit", "demo"), ("dit", "tiny"), ("preview", "default"), ("preview", "tiny"),
            ("quality", "demo"), ("quality", "tiny")]


def _config(task: str, variant: str):
  config = importlib.import_module(f"configs.{task}").get_config(variant)
  if "data" in config and config.data.source != "procedural":
    config.data.path = "/data/faces_webface_112x112/train.rec"  # validate needs one
  if "generated" in config:
    config.generated.workdir = "/runs/gen_demo"  # required by the quality task
  return config


@pytest.mark.parametrize("task,variant", VARIANTS)
def test_validate_reads_every_declared_field_and_nothing_else(task, variant):
  config = _config(task, variant)
  with config_fields.recording(config) as record:
    module = importlib.import_module(tasks.TASKS[task])
    tasks.resolve_task(config)
    module.validate(config)
  leaves = config_fields.declared(config)
  assert not record.missing, sorted(record.missing)
  assert leaves - record.read == set(), f"declared but never read: {sorted(leaves - record.read)}"


def test_the_recorder_catches_an_undeclared_read_and_an_unread_field():
  # The control: a validate that forgets a field, and code that reads an undeclared one.
  config = _config("preview", "tiny")
  with config_fields.recording(config) as record:
    config.sheet.num_identities  # pylint: disable=pointless-statement
    assert config.get("not_declared", 3) == 3
  assert record.missing == {"not_declared"}
  assert "sheet.yaws" in config_fields.declared(config) - record.read


@pytest.mark.parametrize("field,value", [("optim.schedule", "linear"), ("train.log_every", -1),
                                         ("data.on_error", "ignore"), ("optim.momentum", 1.5),
                                         ("evals.verify.every", -3),
                                         ("margin.s", float("nan"))])
def test_bad_values_name_the_field(field, value):
  config = _config("fr", "tiny")
  *sections, key = field.split(".")
  node = config
  for section in sections:
    node = node[section]
  node[key] = value
  with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
    importlib.import_module("vigface_jax.train.fr").validate(config)


def test_documented_fields_are_settable_from_the_command_line(tmp_path):
  """`--config.data.bgr_to_rgb=true`, `--config.optim.nesterov=true` and
  `--config.evals.<name>.every=0` parse (the config is locked: undeclared fields would be
  refused) and reach the resolved config.json; a bad value stops with the field's name."""
  base = [sys.executable, "-m", "vigface_jax.main", "--config=configs/preview.py:tiny"]
  script = (
      "import sys; from absl import flags; from ml_collections import config_flags\n"
      "c = config_flags.DEFINE_config_file('config')\n"
      "flags.FLAGS(sys.argv)\n"
      "cfg = c.value\n"
      "print(cfg.data.bgr_to_rgb, cfg.optim.nesterov, cfg.evals.verify.every,"
      " cfg.evals.landmarks.every)\n")
  fr_args = ["--config=configs/fr.py:tiny", "--config.data.bgr_to_rgb=true",
             "--config.optim.nesterov=true", "--config.evals.verify.every=0"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  out = subprocess.run([sys.executable, "-c", script.replace(
      " cfg.evals.landmarks.every", " 0")] + fr_args, cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["True", "True", "0", "0"]
  dit_args = ["--config=configs/dit.py:tiny", "--config.evals.landmarks.every=-1",
              "--config.evals.samples.every=0"]
  out = subprocess.run([sys.executable, "-c", script.replace(
      "cfg.evals.verify.every", "cfg.evals.samples.every")] + dit_args, cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["False", "False", "0", "-1"]
  bad = subprocess.run(base + [f"--workdir={tmp_path}", "--config.seed=-4"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "seed must be an integer ≥ 0" in bad.stderr, bad.stderr[-2000:]
  assert "Traceback" not in bad.stderr
