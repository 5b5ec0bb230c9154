"""Tests for vigface_jax.parallel: meshes, logical-axis rules, multi-host helpers.

The multi-device test runs in a subprocess with 8 fake CPU devices, because
the device count is fixed when a JAX backend starts.
"""

import textwrap

from flax import linen
import jax
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from vigface_jax import parallel

from conftest import run_on_fake_devices


def test_create_mesh_fills_minus_one_with_remaining_devices():
  mesh = parallel.create_mesh(("data", "fsdp", "model"), (-1, 1, 1))
  assert mesh.axis_names == ("data", "fsdp", "model")
  assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "model": 1}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3


def test_mesh_from_config():
  config = ml_collections.ConfigDict(
      {"mesh": {"axes": ("data", "model"), "shape": (1, -1)}}
  )
  mesh = parallel.mesh_from_config(config)
  assert dict(mesh.shape) == {"data": 1, "model": jax.device_count()}


@pytest.mark.parametrize(
    "axes, shape, match",
    [
        (("data", "model"), (1,), r"mesh\.axes.*mesh\.shape"),
        (("data",), (jax.device_count() + 1,), r"mesh\.shape"),
        (("data", "model"), (-1, -1), r"mesh\.shape.*-1"),
        (("data",), (0,), r"mesh\.shape"),
        (("data", "data"), (1, 1), r"mesh\.axes.*unique"),
    ],
)
def test_create_mesh_errors_name_the_field(axes, shape, match):
  with pytest.raises(ValueError, match=match):
    parallel.create_mesh(axes, shape)


def test_logical_to_spec_rule_semantics():
  rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),  # fsdp is taken by batch when both appear.
      ("embed", "model"),  # ... so embed falls through to the next rule.
      ("mlp", "model"),
      ("conv", None),
      ("conv", "data"),  # never reached: the None rule pinned conv first.
  )
  # First unused axis wins; a repeated mesh axis is avoided.
  assert parallel.logical_to_spec(("batch", "embed"), rules) == P(
      ("data", "fsdp"), "model"
  )
  assert parallel.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "model")
  # embed took model in the first case; here mlp cannot use it again.
  assert parallel.logical_to_spec(("batch", "embed", "mlp"), rules) == P(
      ("data", "fsdp"), "model", None
  )
  # Unknown names and None are replicated; an explicit None rule is final.
  assert parallel.logical_to_spec(("unknown", None, "conv"), rules) == P(
      None, None, None
  )
  assert parallel.logical_to_spec(None, rules) == P()
  with pytest.raises(ValueError, match="more than once"):
    parallel.logical_to_spec(("embed", "embed"), rules)


@pytest.mark.parametrize(
    "names",
    [("batch", "embed"), ("embed", "batch"), ("embed", "mlp"),
     ("batch", "embed", "mlp"), ("unknown", "classes"), ("channels_in",)],
)
def test_logical_to_spec_matches_flax_linen(names):
  rules = parallel.DEFAULT_RULES + (("embed", "model"), ("batch", "model"))
  assert parallel.logical_to_spec(names, rules) == linen.logical_to_mesh_axes(
      names, rules
  )


def test_rules_drop_mesh_axes_the_mesh_lacks():
  mesh = parallel.create_mesh(("data", "model"), (-1, 1))
  # No 'fsdp' axis: batch is split over data only, embed falls back to None.
  assert parallel.batch_sharding(mesh).spec == P("data")
  assert parallel.logical_sharding(mesh, ("embed", "classes")).spec == P(
      None, "model"
  )
  # A rule naming only missing axes is skipped, not turned into a None rule.
  rules = (("embed", "fsdp"), ("embed", "data"))
  assert parallel.logical_sharding(mesh, ("embed",), rules).spec == P("data")


def test_tree_shardings_maps_every_leaf():
  mesh = parallel.create_mesh(("data", "fsdp", "model"), (-1, 1, 1))
  tree = {"w": ("embed", "classes"), "b": ("classes",), "scale": (), "c": None}
  out = parallel.tree_shardings(mesh, tree)
  assert out["w"].spec == P("fsdp", "model")
  assert out["b"].spec == P("model")
  assert out["scale"].spec == P()
  assert out["c"].spec == P()


def test_process_batch_size_checks_divisibility():
  mesh = parallel.create_mesh(("data",), (-1,))
  assert parallel.process_batch_size(8, mesh) == 8 // jax.process_count()
  with pytest.raises(ValueError, match="global_batch_size"):
    parallel.process_batch_size(0)


def test_maybe_initialize_distributed_clean_env(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS",
              "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("SLURM_NTASKS", "1")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
  assert not parallel.maybe_initialize_distributed("auto")
  assert not parallel.maybe_initialize_distributed("never")
  with pytest.raises(ValueError, match="mode"):
    parallel.maybe_initialize_distributed("sometimes")
  assert parallel.is_main_process()


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
        ({"SLURM_NTASKS": "4"}, "SLURM_NTASKS"),
        ({"SLURM_NTASKS": "1"}, None),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_SIZE"),
        ({"TPU_WORKER_HOSTNAMES": "a,b"}, "TPU_WORKER_HOSTNAMES"),
        ({"MEGASCALE_COORDINATOR_ADDRESS": "x"}, "MEGASCALE_COORDINATOR_ADDRESS"),
    ],
)
def test_multiprocess_detection(env, expected):
  assert parallel._env_says_multiprocess(env) == expected  # pylint: disable=protected-access


def test_explicit_process_args_from_the_launchers_variables():
  env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:4567", "JAX_NUM_PROCESSES": "3",
         "JAX_PROCESS_ID": "2"}
  assert parallel.explicit_process_args(env) == {
      "coordinator_address": "127.0.0.1:4567", "num_processes": 3, "process_id": 2}
  assert parallel.explicit_process_args({"JAX_COORDINATOR_ADDRESS": "h:1"}) == {}
  for bad, match in (({"JAX_NUM_PROCESSES": "2"}, "both"),
                     ({**env, "JAX_PROCESS_ID": "3"}, r"\[0, JAX_NUM_PROCESSES=3\)"),
                     ({**env, "JAX_PROCESS_ID": "x"}, "integers"),
                     ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "COORDINATOR")):
    with pytest.raises(ValueError, match=match):
      parallel.explicit_process_args(bad)


def test_maybe_initialize_distributed_passes_the_launchers_variables(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(parallel, "_distributed_initialized", False)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:4567")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  assert parallel.maybe_initialize_distributed("auto")
  assert calls == [{"coordinator_address": "127.0.0.1:4567", "num_processes": 2,
                    "process_id": 1}]


def test_host_to_global_single_process():
  mesh = parallel.create_mesh(("data",), (-1,))
  tree = {"x": np.arange(8, dtype=np.float32).reshape(4, 2)}
  out = parallel.host_to_global(tree, mesh, P("data"))
  assert out["x"].sharding.spec == P("data")
  np.testing.assert_array_equal(np.asarray(out["x"]), tree["x"])


# Runs with 8 fake CPU devices: mesh data=-1 x model=2, a real pipeline batch
# (tiny in-test source, no workers) assembled into a global array.
_EIGHT_DEVICE_SCRIPT = textwrap.dedent("""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from vigface_jax import parallel
    from vigface_jax.data import pipeline
    from tests.test_pipeline import TinyFaceSource

    assert jax.device_count() == 8, jax.devices()
    mesh = parallel.create_mesh(("data", "fsdp", "model"), (-1, 1, 2))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "model": 2}
    # Batch 8 splits 4 ways (data x fsdp); model replicas hold the same rows.
    with __import__("pytest").raises(ValueError, match="multiple of 4"):
      parallel.process_batch_size(6, mesh)
    loader = pipeline.make_loader(
        TinyFaceSource(32), global_batch_size=8, seed=3, worker_count=0)
    host = next(iter(loader))
    it = pipeline.GlobalBatchIterator(loader, mesh)
    batch = next(it)
    for key, local in host.items():
      arr = batch[key]
      assert isinstance(arr.sharding, NamedSharding), arr.sharding
      assert arr.sharding.spec == P(("data", "fsdp")), arr.sharding.spec
      assert arr.shape == local.shape and arr.dtype == local.dtype, key
      shards = arr.addressable_shards
      assert len(shards) == 8, len(shards)
      assert {s.data.shape for s in shards} == {(2,) + local.shape[1:]}, key
      for s in shards:
        np.testing.assert_array_equal(np.asarray(s.data), local[s.index])
      np.testing.assert_array_equal(np.asarray(arr), local)
    # Both devices of a model pair hold the same rows.
    row_of = {
        s.device: s.index[0].start for s in batch["image"].addressable_shards}
    for pair in mesh.devices.reshape(4, 2):
      assert row_of[pair[0]] == row_of[pair[1]]
    assert pipeline.batch_spec(8, mesh)["image"].sharding == it.sharding
    print("OK")
""")


def test_eight_fake_devices_global_batch():
  run_on_fake_devices(_EIGHT_DEVICE_SCRIPT, timeout=120)
