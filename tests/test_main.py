"""The entry point, config handling, metric files and the preview task (the main job)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

import config_fields
from conftest import cli_env
from configs import preview as preview_config
from vigface_jax import config_lib
from vigface_jax import main as main_lib
from vigface_jax import metrics
from vigface_jax import tasks
from vigface_jax.data import landmarks
from vigface_jax.evaluate import verification

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_parse_arg_variants_and_types():
  args = config_lib.parse_arg("tiny", variant="default", n=1, flag=False)
  assert args.variant == "tiny" and args.n == 1
  args = config_lib.parse_arg("variant=x,n=3,flag=true", variant="default", n=1, flag=False)
  assert (args.variant, args.n, args.flag) == ("x", 3, True)
  with pytest.raises(ValueError, match="unknown config argument 'bogus'"):
    config_lib.parse_arg("bogus=1", variant="default")


def test_unknown_task_and_missing_required_field_are_named(monkeypatch):
  config = preview_config.get_config("tiny")
  config.task = "nope"
  with pytest.raises(main_lib.ConfigError, match=r"unknown task config.task='nope'.*preview"):
    tasks.resolve_task(config)
  config.task = "preview"
  monkeypatch.setattr("vigface_jax.preview.REQUIRED_FIELDS", ("pairs.num_pairs", "data.path"),
                      raising=False)
  with pytest.raises(main_lib.ConfigError, match="'data.path' is missing"):
    tasks.resolve_task(config)
  config.unlock()
  config.data = {"path": None}
  with pytest.raises(main_lib.ConfigError,
                     match=r"'data.path' is required for task 'preview'.*--config.data.path="):
    tasks.resolve_task(config)


def test_metric_writer_and_summary(tmp_path):
  with metrics.MetricWriter(tmp_path) as writer:
    writer.write_scalars(3, {"loss": np.float32(0.5), "acc": 1, "skip": [1, 2]})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[0]) == {"step": 3, "loss": 0.5, "acc": 1}
  assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())
  metrics.write_summary(tmp_path, {"x": np.float64(2.5), "nan": float("nan"), "v": np.arange(2),
                                   "ok": np.bool_(True)})
  assert json.loads((tmp_path / "summary.json").read_text()) == {"x": 2.5, "nan": None,
                                                                "v": [0, 1], "ok": True}


def test_preview_main_job_writes_sheet_pack_and_summary(tmp_path):
  config = preview_config.get_config("tiny")
  with config_fields.recording(config) as record:
    summary = main_lib.run(config, str(tmp_path))
  assert not record.missing, sorted(record.missing)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["task"] == "preview" and saved["pairs"]["num_pairs"] == 40
  sheet = np.asarray(Image.open(tmp_path / "contact_sheet.png"))
  rows, cols = config.sheet.num_identities, len(config.sheet.yaws)
  assert sheet.shape == (rows * 114, cols * 226, 3)
  # Right half of each cell is a landmark image: black with pure-coloured diamonds.
  cell = sheet[:112, 112:224]
  assert set(map(tuple, cell.reshape(-1, 3))) <= {(0, 0, 0)} | set(
      map(tuple, landmarks.LANDMARK_COLOURS))
  images, issame = verification.load_bin(tmp_path / "verification" / "procedural.bin")
  assert images.shape == (80, 112, 112, 3) and issame.sum() == 20
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk["num_pairs"] == 40 == summary["num_pairs"]
  for name in ("raw_pixels", "random_network"):
    assert 0.0 <= on_disk[f"baseline/{name}/accuracy"] <= 1.0
  assert (tmp_path / "metrics.jsonl").exists()


def test_command_line_errors_are_one_readable_line(tmp_path):
  base = [sys.executable, "-m", "vigface_jax.main", "--config=configs/preview.py:tiny",
          f"--workdir={tmp_path}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(base + ["--config.pairs.num_pair=3"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "unknown config field 'num_pair'" in proc.stderr
  assert 'Did you mean "num_pairs"' in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "config.json").exists()


def test_jobs_keep_compiled_programs_in_a_persistent_cache(tmp_path):
  """`main` sets JAX's persistent compilation cache: the user cache directory by default,
  JAX_COMPILATION_CACHE_DIR when set, none when that is empty."""
  home = tmp_path / "home"
  assert main_lib.compilation_cache_dir({"JAX_COMPILATION_CACHE_DIR": "/x"}) == "/x"
  assert main_lib.compilation_cache_dir({"JAX_COMPILATION_CACHE_DIR": ""}) is None
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("XLA_") and k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(HOME=str(home), JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
  proc = subprocess.run([sys.executable, "-m", "vigface_jax.main",
                         "--config=configs/preview.py:tiny", f"--workdir={tmp_path / 'w'}"],
                        env=env, cwd=pathlib.Path(__file__).resolve().parents[1],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  cache = home / ".cache" / "vigface_jax" / "xla"
  assert cache.is_dir() and any(cache.iterdir()), "no compiled program was cached"
  assert main_lib.compilation_cache_dir({}) == os.path.join(
      os.path.expanduser("~"), ".cache", "vigface_jax", "xla")


def test_trainers_cpu_xla_flags_added_unless_named_or_switched_off():
  import vigface_jax  # pylint: disable=g-import-not-at-top
  # The trainers only: the flag slows the sampler and the audit search (BENCHMARKS.md).
  assert set(vigface_jax.TRAINING_TASKS) == {"fr", "dit"}
  assert set(vigface_jax.TRAINING_TASKS) <= set(tasks.TASKS)
  (flag,) = vigface_jax.CPU_XLA_FLAGS
  name = flag.split("=")[0]
  assert vigface_jax.with_cpu_xla_flags("") == flag
  both = vigface_jax.with_cpu_xla_flags("--xla_force_host_platform_device_count=8")
  assert both == f"--xla_force_host_platform_device_count=8 {flag}"
  assert vigface_jax.with_cpu_xla_flags(f"{name}=eltwise") == f"{name}=eltwise"  # user's wins
  for off in ("0", "false", "OFF"):
    assert vigface_jax.with_cpu_xla_flags("--a=1", off) == "--a=1"
  # In a fresh process: the flag is in XLA_FLAGS when the backend starts and reaches XLA, which
  # then leaves a convolution's weight gradient out of YNNPACK (YNN fusions for dots only);
  # without it (the control) that convolution is a YNN fusion.
  code = ("import vigface_jax, os\n"
          "vigface_jax.add_cpu_xla_flags()\n"
          "import jax, jax.numpy as jnp\n"
          "x, w = jnp.ones((8, 16, 16, 32)), jnp.ones((3, 3, 32, 32))\n"
          "f = lambda w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers="
          "('NHWC', 'HWIO', 'NHWC')).sum()\n"
          "hlo = jax.jit(jax.grad(f)).lower(w).compile().as_text()\n"
          "print(os.environ.get('XLA_FLAGS', ''), '|', '__ynn_fusion' in hlo)\n")
  out = {}
  for switch in ("1", "0"):
    env = dict(cli_env(), **{vigface_jax.ENV_SWITCH: switch})
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120, check=True)
    out[switch] = result.stdout.strip().splitlines()[-1]
  assert out["1"] == f"{flag} | False", out
  assert out["0"] == "| True", out  # XLA_FLAGS unset
