"""Global batches that do not depend on the process or worker count (`GlobalBatchSampler`).

Process p of P loads only its slice of each global batch, yet the slices of all processes,
put together in process order, are exactly the batch one process loads alone: the same
records, in the same order, flipped the same way, with or without worker processes. And a
position written under one layout restores under another (`set_position`): the next batch
is the one an uninterrupted run sees.
"""

import grain
import numpy as np
import pytest

from vigface_jax.data import faces
from vigface_jax.data import pipeline

_RECORDS, _BATCH = 48, 8


def _source():
  # One image per identity: a record's label is its index.
  return faces.ProceduralFaceSource(seed=3, num_identities=_RECORDS, images_per_identity=1,
                                    cache=True)


def _loader(p, count, workers=0, num_epochs=None):
  return pipeline.make_loader(
      _source(), global_batch_size=_BATCH, seed=5, worker_count=workers, flip_prob=0.5,
      num_epochs=num_epochs, read_threads=0,
      shard_options=grain.sharding.ShardOptions(shard_index=p, shard_count=count,
                                                drop_remainder=True))


def _batches(loader, n, start=None):
  it = iter(loader)
  if start is not None:
    it.set_state(pipeline.position_state(loader, it.get_state(), start))
  return [next(it) for _ in range(n)]


def _global(count, n, workers=0, start=None):
  """n global batches assembled from `count` processes' slices: (labels, flipped-ness)."""
  per = [_batches(_loader(p, count, workers), n, start) for p in range(count)]
  out = []
  for i in range(n):
    labels = np.concatenate([per[p][i]["label"] for p in range(count)])
    images = np.concatenate([per[p][i]["image"] for p in range(count)])
    out.append((labels, images))
  return out


def _same(a, b):
  assert len(a) == len(b)
  for (la, ia), (lb, ib) in zip(a, b):
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(ia, ib)  # same records, same flips


@pytest.mark.parametrize("count", [2, 4])
def test_process_slices_make_the_single_process_batches(count):
  one = _global(1, 4)
  _same(_global(count, 4), one)
  # Each process read only its own part: disjoint slices of every batch.
  slices = [_batches(_loader(p, count), 1)[0]["label"] for p in range(count)]
  assert sum(len(s) for s in slices) == _BATCH and len(set(np.concatenate(slices))) == _BATCH
  assert len(set(one[0][0])) == _BATCH  # and a shuffled batch of distinct records


def test_worker_processes_do_not_change_the_batches():
  _same(_global(2, 3, workers=2), _global(1, 3))


@pytest.mark.parametrize("saved, resumed", [(2, 1), (1, 4)])
def test_a_position_restores_under_another_process_count(saved, resumed):
  uninterrupted = _global(saved, 5)
  _same(_global(resumed, 2, start=3), uninterrupted[3:5])


def test_position_with_workers_matches_grain_own_state():
  """After k batches, grain's own recorded state equals the state built from k."""
  for workers in (0, 2):
    loader = _loader(1, 2, workers)
    it = iter(loader)
    fresh = it.get_state()
    for k in range(1, 4):
      next(it)
      assert (pipeline.position_state(loader, fresh, k).decode().replace(" ", "")
              == it.get_state().decode().replace(" ", "")), (workers, k)


def test_finite_epochs_end_at_the_same_batch_on_every_process():
  # 48 records, batches of 8, 2 epochs: 12 global batches, 6 records each per process.
  for p in range(2):
    assert len(list(_loader(p, 2, num_epochs=2))) == 12
  with pytest.raises(ValueError, match="num_batches"):
    pipeline.position_state(_loader(0, 1), iter(_loader(0, 1)).get_state(), -1)
