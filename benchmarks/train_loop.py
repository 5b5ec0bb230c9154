r"""The training loop's host work: how often it reads the non-finite flag, and what the loop
costs beyond its jitted step.

    python -m benchmarks.train_loop --write                     # the stage-1 demo and tiny
    python -m benchmarks.train_loop --configs=tiny --steps=24 --repeats=1   # seconds

For each `configs/fr.py` variant named (`demo`: the stage-1 demo; `tiny`: the tests' config,
whose step takes milliseconds, so the host's share shows), `loop.fit` trains `--steps` steps
on the task's own input pipeline (procedural faces rendered by the config's grain workers),
once with each `train.finite_check_every` setting:

* `1`: the loop until 2026-12-02 (every step reads the previous step's `finite` flag, so the
  host waits on the device once a step and never runs more than a step ahead);
* `0`: the loop now (the flags are read at log steps, checkpoints and the end only; big_vision
  reads at log steps).

Passes interleave (`--repeats`). The figure is images/s over every logged window but the
first (the first holds the compile and the pipeline's start), from the loop's own
`train/step_time_s`. Beside them, `step alone`: the same config's jitted step (the one `fit`
builds, `loop.make_trainer`) timed on one batch already on the device, without the input
pipeline or host reads. What separates the loop from the step alone is the loop's overhead:
the input pipeline (whose workers render on the same cores here) and the host's work; it is
also the most an input prefetch to the device could win.

On CPU this runs with the trainers' XLA flag (`vigface_jax.add_cpu_xla_flags`), as
`python -m vigface_jax.main` does for the `fr` task.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
from typing import Any

import vigface_jax

SECTION = "## Training loop: host reads and overhead"
SETTINGS = (1, 0)  # train.finite_check_every: before (every step, one late), now (log steps)


def _config(variant: str, steps: int):
  from configs import fr as fr_config  # pylint: disable=g-import-not-at-top
  config = fr_config.get_config(variant)
  config.train.num_steps = steps
  config.train.log_every = max(1, steps // 4)
  config.train.checkpoint_every = 0
  config.train.async_checkpoint = True
  return config


def _task(variant: str, steps: int, data_fn):
  """The `fr` task's pieces for `configs/fr.py:<variant>`, as `train/fr.py` `run` builds
  them: `data_fn(config, mesh, data, create_model, loss_fn)` runs with its input pipeline open."""
  from vigface_jax import parallel  # pylint: disable=g-import-not-at-top
  from vigface_jax.data import pipeline
  from vigface_jax.train import fr

  config = _config(variant, steps)
  fr.validate(config)
  mesh = parallel.mesh_from_config(config)
  with pipeline.make_pipeline(config, mesh, config.sharding_rules) as data:
    n = pipeline.num_classes(config, data.source)
    k = int(config.virtual.num_virtual)
    pad = fr.class_padding(config, mesh, n + k)
    return data_fn(config, mesh, data, fr.create_model(config, n, k, pad),
                   fr._loss_fn(config, mesh))  # pylint: disable=protected-access


def _fit(variant: str, steps: int, every: int, workdir: str) -> float:
  """images/s of `loop.fit` over the logged windows after the first."""
  from vigface_jax.train import loop  # pylint: disable=g-import-not-at-top

  def fit(config, mesh, data, create_model, loss_fn):
    config.train.finite_check_every = every
    loop.fit(config, workdir, mesh=mesh, create_model=create_model, loss_fn=loss_fn,
             data=data, images_per_step=int(config.data.global_batch_size))
    return int(config.data.global_batch_size)

  batch_size = _task(variant, steps, fit)
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  timed = [r for r in records if "train/step_time_s" in r]
  if len(timed) < 2:
    raise ValueError(f"--steps={steps}: too few steps for a timed window after the first")
  seconds = sum(r["train/step_time_s"] * (r["step"] - p["step"])
                for p, r in zip(timed, timed[1:]))
  return batch_size * (timed[-1]["step"] - timed[0]["step"]) / seconds


def _step_alone(variant: str, steps: int) -> float:
  """images/s of the config's jitted step on one device batch, each step blocked on
  (`benchmarks/train_step.py`'s `build` and `time_steps`, as the step benchmarks time it)."""
  from benchmarks import train_step  # pylint: disable=g-import-not-at-top

  def alone(config, mesh, data, create_model, loss_fn):
    batch = next(data)
    trainer = train_step.build(config, mesh, create_model, loss_fn)
    times = train_step.time_steps(trainer, batch, max(3, steps // 4))["times"]
    return int(config.data.global_batch_size) / statistics.median(times)

  return _task(variant, steps, alone)


def measure(variants: list[str], steps: int, repeats: int) -> list[dict[str, Any]]:
  rows = []
  with tempfile.TemporaryDirectory(prefix="train_loop_") as tmp:
    for variant in variants:
      figures: dict[str, list[float]] = {str(s): [] for s in SETTINGS}
      alone = []
      for r in range(repeats):
        for every in SETTINGS:
          workdir = os.path.join(tmp, f"{variant}_{every}_{r}")
          figures[str(every)].append(_fit(variant, steps, every, workdir))
          print(f"{variant} finite_check_every={every} pass {r}: "
                f"{figures[str(every)][-1]:.1f} images/s", flush=True)
        alone.append(_step_alone(variant, steps))
        print(f"{variant} step alone pass {r}: {alone[-1]:.1f} images/s", flush=True)
      rows.append({"config": variant, "steps": steps, "passes": repeats,
                   "before": figures["1"], "now": figures["0"], "alone": alone})
  return rows


def table(rows: list[dict[str, Any]]) -> list[str]:
  out = ["| `configs/fr.py:` | steps | loop, flag read every step (before), images / s | "
         "loop, flags read at log steps (now), images / s | now / before | step alone, "
         "images / s | loop now / step alone |",
         "|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    before, now, alone = (statistics.median(r[k]) for k in ("before", "now", "alone"))
    out.append(f"| `{r['config']}` | {r['steps']} | {before:.1f} | {now:.1f} | "
               f"**{now / before:.2f}** | {alone:.1f} | {now / alone:.2f} |")
  return out


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m benchmarks.train_loop", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--configs", default="demo,tiny", help="configs/fr.py variants, comma-separated")
  p.add_argument("--steps", type=int, default=200, help="steps of each fit (4 log windows)")
  p.add_argument("--repeats", type=int, default=3, help="interleaved passes; medians reported")
  p.add_argument("--write", action="store_true", help="replace the section in --output")
  p.add_argument("--output", default="BENCHMARKS.md")
  p.add_argument("--json", default="", help="also write the rows and machine line here")
  return p.parse_args(argv)


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  if args.steps < 8:
    raise SystemExit(f"--steps={args.steps}: at least 8 (two timed log windows of 2)")
  vigface_jax.add_cpu_xla_flags()  # as `python -m vigface_jax.main` does for `fr`
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()  # grain reads absl flags outside absl.app.run
  from benchmarks import data_pipeline  # pylint: disable=g-import-not-at-top  # after the flag
  info = data_pipeline.machine()
  rows = measure(args.configs.split(","), args.steps, args.repeats)
  info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
  sys.argv = ["train_loop", *argv]
  lines = [*data_pipeline.section_header(SECTION, "benchmarks.train_loop", info),
           f"Medians of {args.repeats} interleaved pass(es); each figure is `loop.fit`'s own "
           "`train/step_time_s` over its timed windows (see the module docstring). `XLA_FLAGS`: "
           f"{os.environ.get('XLA_FLAGS', '')!r}.", "", *table(rows), ""]
  text = "\n".join(lines)
  print(text)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps({"machine": info, "rows": rows}, indent=1),
                                       encoding="utf-8")
  if args.write:
    data_pipeline.write_output(args.output, text, SECTION)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
