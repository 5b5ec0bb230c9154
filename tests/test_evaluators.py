"""The evaluator interface (`vigface_jax/evaluate/common.py`): when they run, how configs build
them, and that the trainer hands them its one metric writer."""

from __future__ import annotations

import json

from ml_collections import config_dict
import pytest

from vigface_jax import config_lib
from vigface_jax import metrics as metrics_lib
from vigface_jax.evaluate import common


class Counter(common.Evaluator):
  """Counts its runs; writes an image through the trainer's writer."""

  def __init__(self, name, cfg, context):
    super().__init__(name, cfg.every)
    self.scale = cfg.scale
    self.log = context["log"]
    self.active = cfg.scale > 0

  @classmethod
  def check(cls, options):
    options.float("scale", 0.0)

  def run(self, step, state, writer):
    self.log.append((self.name, step))
    return {"value": self.scale * step}


def _evals(**sections):
  return config_dict.ConfigDict({name: dict(type="counter", **cfg)
                                 for name, cfg in sections.items()})


def test_due_every_at_the_end_and_off():
  steps = range(1, 8)
  assert [s for s in steps if common.Evaluator("a", 3).due(s, 7)] == [3, 6, 7]
  assert [s for s in steps if common.Evaluator("a", 0).due(s, 7)] == [7]
  assert [s for s in steps if common.Evaluator("a", -1).due(s, 7)] == []


def test_from_config_builds_by_type_skips_off_and_inactive(monkeypatch, tmp_path):
  monkeypatch.setitem(common.REGISTRY, "counter", f"{__name__}:Counter")
  log = []
  evals = _evals(often=dict(every=2, scale=1.0), end=dict(every=0, scale=10.0),
                 off=dict(every=-1, scale=1.0), idle=dict(every=1, scale=0.0))
  common.validate(evals, ("counter",))
  built = common.from_config(evals, {"log": log})
  assert sorted(e.name for e in built) == ["end", "often"]
  with metrics_lib.MetricWriter(tmp_path) as writer:
    figures = {}
    for step in range(1, 6):
      figures.update(common.run_due(built, step, 5, None, writer))
  assert sorted(log) == [("end", 5), ("often", 2), ("often", 4), ("often", 5)]
  assert figures == {"often/value": 5.0, "end/value": 50.0}
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {"step": 5, "often/value": 5.0} in lines and {"step": 5, "end/value": 50.0} in lines


@pytest.mark.parametrize("section,match", [
    (dict(type="nope", every=1), r"evals\.x\.type='nope'"),
    (dict(type="counter", every=-2), r"evals\.x\.every must be an integer ≥ -1"),
    (dict(type="counter", every=True), r"evals\.x\.every"),
    (dict(type="counter", every=1, scale=-1.0), r"evals\.x\.scale must be a finite number ≥ 0"),
])
def test_bad_sections_name_the_field(monkeypatch, section, match):
  monkeypatch.setitem(common.REGISTRY, "counter", f"{__name__}:Counter")
  with pytest.raises(config_lib.ConfigError, match=match):
    common.validate(config_dict.ConfigDict({"x": section}), ("counter",))
