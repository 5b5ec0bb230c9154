"""Compile-only dry runs (`--config.dry_run=True`) on 8 fake CPU devices, in one subprocess.

Each dry run goes through `vigface_jax.main.run` as the command line would. They must: read
no data (stage 1 points at a RecordIO file that does not exist), initialise nothing and write
no checkpoint; report XLA's per-device memory and FLOPs and the sharding of the largest
arrays; show the class-sharded head's state shrinking 8× per device when `classes` goes over
the 8-device model axis; compile stage 2 without a stage-1 run; and stop with an error that
names the field or the array when the batch or the class-centre matrix does not split over
the devices, or when a task has no dry run. A class count that does not divide the model axis
is padded. Where libtpu is installed (the test extra installs it), the same dry runs compile
ahead of time for a named Cloud TPU slice on this CPU-only host.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

from conftest import require

_REPO = pathlib.Path(__file__).resolve().parents[1]

# Both children: the ConfigError each bad config stops with (None: it ran), and the results.
_HELPERS = textwrap.dedent("""
    def errors_of(cases, out):
      from vigface_jax import config_lib, main
      errors = {}
      for name, config in cases:
        try:
          main.run(config, os.path.join(out, "err_" + name))
          errors[name] = None
        except config_lib.ConfigError as e:
          errors[name] = str(e)
      return errors

    def save(results, out):
      with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(results, fh, default=str)
    """)

def _with_helpers(child: str) -> str:
  return "import json, os\n" + _HELPERS + child


_CHILD = textwrap.dedent("""
    import json, os, sys
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    import jax
    cache = os.environ.get("VIGFACE_TEST_JAX_CACHE")
    if cache:
      jax.config.update("jax_compilation_cache_dir", cache)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    assert jax.device_count() == 8, jax.devices()
    from configs import dit, fr, preview
    from vigface_jax import config_lib, main
    out = sys.argv[1]
    results = {}

    def stage1(mesh_shape):
      c = fr.get_config("tiny")
      c.dry_run = True
      c.data.source, c.data.path = "recordio", "/nonexistent/train.rec"  # never opened
      c.model.num_real = 4000
      c.virtual.num_virtual = 4000
      c.mesh.shape = mesh_shape
      return c

    for name, shape in (("fr_data", (8, 1, 1)), ("fr_classes", (1, 1, 8))):
      results[name] = main.run(stage1(shape), os.path.join(out, name))
    padded = stage1((1, 1, 8))
    padded.model.num_real = 4001  # 8001 centres: padded to 8008 so they split over 8 devices
    padded.margin.sample_rate = 0.25
    results["fr_padded"] = main.run(padded, os.path.join(out, "fr_padded"))
    c = dit.get_config("tiny")
    c.dry_run, c.model.num_real, c.data.global_batch_size = True, 16, 8
    results["dit"] = main.run(c, os.path.join(out, "dit"))
    bad = stage1((8, 1, 1))
    bad.data.global_batch_size = 12
    c = dit.get_config("tiny")
    c.dry_run, c.data.global_batch_size = True, 8
    g = preview.get_config()
    g.dry_run = True
    uneven = stage1((1, 1, 8))
    uneven.model.num_real = 4001
    uneven.model.class_multiple = 3  # 8001 centres, a multiple of 3 but not of 8 devices
    results["errors"] = errors_of((("batch", bad), ("num_real", c), ("preview", g),
                                   ("uneven", uneven)), out)
    save(results, out)
    """)


def test_dry_runs_on_eight_fake_devices(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=f"{_REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  proc = subprocess.run([sys.executable, "-c", _with_helpers(_CHILD), str(tmp_path)], env=env, cwd=_REPO,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  results = json.loads((tmp_path / "results.json").read_text())

  for name in ("fr_data", "fr_classes", "fr_padded", "dit"):
    figures = results[name]["dry_run"]
    saved = json.loads((tmp_path / name / "dry_run.json").read_text())
    assert saved["dry_run"]["memory_per_device"] == figures["memory_per_device"]
    mem = figures["memory_per_device"]
    assert mem["argument"] > 0 and mem["total"] >= mem["argument"], mem
    assert figures["flops_per_step"] > 0 and figures["devices"] == 8
    assert figures["compute_dtype"] == "float32"  # 'auto' on CPU devices
    assert figures["largest_arrays"], figures
    assert not (tmp_path / name / "checkpoints").exists(), "a dry run wrote a checkpoint"
    assert "memory per device (XLA)" in proc.stdout and "largest arrays" in proc.stdout

  # The centre matrix [d, 4000 + 4000]: replicated on the data mesh, split 8 ways over 'model'.
  head = lambda name: next(a for a in results[name]["dry_run"]["largest_arrays"]
                           if a["name"] == "params/head/weight")
  d = head("fr_data")["shape"][0]
  assert head("fr_data")["shape"] == head("fr_data")["shard_shape"] == [d, 8000]
  assert head("fr_classes")["shard_shape"] == [d, 1000]
  assert head("fr_classes")["bytes_per_device"] * 8 == head("fr_data")["bytes_per_device"]
  data_state = results["fr_data"]["dry_run"]["state_bytes_per_device"]
  class_state = results["fr_classes"]["dry_run"]["state_bytes_per_device"]
  head_bytes = head("fr_data")["bytes_per_device"]  # params; SGD momentum doubles it
  assert data_state - class_state >= 2 * (head_bytes - head_bytes // 8) * 0.99
  assert (results["fr_classes"]["dry_run"]["memory_per_device"]["argument"]
          < results["fr_data"]["dry_run"]["memory_per_device"]["argument"])
  assert results["dit"]["dry_run"]["frozen_fr"]["arch"] == "tiny"
  # Stage 3's sampler for the same model and mesh: one call of sample.batch_size (4) images,
  # rounded up to the 8 batch shards.
  sampler = results["dit"]["dry_run"]["sampler"]
  assert sampler["images_per_call"] == 8 and sampler["flops_one_step"] > 0
  assert sampler["memory_per_device"]["total"] > 0 and "generation sampler" in proc.stdout
  # A class count that does not split: padded to the next multiple of the model axis (and the
  # Partial FC step compiles over the padded, sharded head).
  padded = results["fr_padded"]["dry_run"]
  assert padded["num_padding"] == 7 and head("fr_padded")["shape"] == [d, 8008]
  assert head("fr_padded")["shard_shape"] == [d, 1001]
  assert padded["sample_rate"] == 0.25

  errors = results["errors"]
  assert errors["batch"] and "global_batch_size=12" in errors["batch"], errors
  assert errors["num_real"] and "model.num_real" in errors["num_real"], errors
  assert errors["preview"] and "dry_run" in errors["preview"], errors
  assert errors["uneven"] and "params/head/weight" in errors["uneven"], errors
  assert "(8, 8001)" in errors["uneven"] or "8001" in errors["uneven"], errors


_TPU_CHILD = textwrap.dedent("""
    import json, os, sys
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    import jax
    assert jax.default_backend() == "cpu", jax.devices()
    from configs import dit, fr
    from vigface_jax import config_lib, main
    out = sys.argv[1]
    results = {}
    c = fr.get_config("tiny")
    c.dry_run, c.dry_run_topology, c.mesh.shape = True, "v5e:2x4", (2, 1, 4)
    c.model.num_real, c.virtual.num_virtual = 4000, 4000  # the head is the largest array
    results["fr"] = main.run(c, os.path.join(out, "fr"))["dry_run"]
    c = dit.get_config("tiny")
    c.dry_run, c.dry_run_topology, c.model.num_real = True, "v5p:2x2x2", 16
    c.data.global_batch_size = 8
    results["dit"] = main.run(c, os.path.join(out, "dit"))["dry_run"]
    cases = []
    for name, topo, dry in (("unknown", "v5e:3x3", True), ("malformed", "v5e-8", True),
                            ("no_dry_run", "v5e:2x4", False)):
      c = fr.get_config("tiny")
      c.dry_run, c.dry_run_topology = dry, topo
      cases.append((name, c))
    results["errors"] = errors_of(cases, out)
    save(results, out)
    """)


def test_dry_run_compiles_for_a_tpu_slice_ahead_of_time(tmp_path):
  require("libtpu", 'the TPU ahead-of-time dry run needs libtpu: pip install -e ".[test]"')
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=f"{_REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", _with_helpers(_TPU_CHILD), str(tmp_path)], env=env, cwd=_REPO,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  results = json.loads((tmp_path / "results.json").read_text())
  for name, kind, mesh in (("fr", "TPU v5 lite", {"data": 2, "fsdp": 1, "model": 4}),
                           ("dit", "TPU v5", {"data": 8, "fsdp": 1, "model": 1})):
    figures = results[name]
    assert figures["devices"] == 8 and figures["device_kind"] == kind, figures
    assert figures["mesh"] == mesh
    assert figures["flops_per_step"] > 0 and figures["memory_per_device"]["argument"] > 0
    assert figures["compute_dtype"] == "bfloat16"  # 'auto' on the slice, not on this CPU host
  head = next(a for a in results["fr"]["largest_arrays"] if a["name"] == "params/head/weight")
  assert head["shard_shape"][1] * 4 == head["shape"][1]
  assert results["dit"]["sampler"]["memory_per_device"]["total"] > 0
  errors = results["errors"]
  assert errors["unknown"] and "dry_run_topology='v5e:3x3'" in errors["unknown"], errors
  assert errors["malformed"] and "'<generation>:<chips>'" in errors["malformed"], errors
  assert errors["no_dry_run"] and "unless dry_run=True" in errors["no_dry_run"], errors
