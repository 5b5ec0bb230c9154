r"""XLA:CPU flags, A/B: each setting of `XLA_FLAGS` runs the same benchmarks beside PyTorch.

    python -m benchmarks.xla_flags --write                    # the CPU suite's training steps
    python -m benchmarks.xla_flags --only=dit_demo --settings=baseline,ynn_dot

Every setting runs each named benchmark of `run.CPU_SUITE` (default `fr_demo` and `dit_demo`)
in its own process through `run.plan` / `run.execute`, with `XLA_FLAGS` set to the setting's
flags and nothing else changed. The benchmark scripts check our step against PyTorch's on the
same batch (loss within their tolerance), so a flag that changes results fails its row rather
than looking fast. Each row: our images/s, PyTorch's in the same process, their ratio, and our
speed against the baseline row's (the PyTorch figure shows how noisy the machine was: a flag
cannot change it). `--repeats` runs the whole list that many times, interleaved, and reports
the median per setting. `--json` keeps the rows with the machine line and the command;
`--from_json` renders (and with `--write` writes) that run's section again without running.

A flag earns a place in `vigface_jax.CPU_XLA_FLAGS` (added for the training tasks) only
when it makes our side faster in every benchmark here, by more than the PyTorch side moved;
`project_defaults` runs with them, every other setting without (`VIGFACE_CPU_XLA_FLAGS=0`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import tempfile

from benchmarks import data_pipeline
from benchmarks import run
import vigface_jax

SECTION = "## XLA:CPU flags (A/B)"

# name -> XLA_FLAGS. Each is one lead of the performance issue or a control.
# Every setting but `project_defaults` runs with `VIGFACE_CPU_XLA_FLAGS=0`, so its `XLA_FLAGS`
# are exactly the ones named; `project_defaults` is what the trainers get (vigface_jax's
# CPU_XLA_FLAGS, which `python -m vigface_jax.main` and the step benchmarks add).
PROJECT_DEFAULTS = "project_defaults"
SETTINGS: dict[str, str] = {
    "baseline": "",
    PROJECT_DEFAULTS: "",
    "ynn_dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "ynn_dot_eltwise_reduce": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
    "xnn_dot": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "vector_width_512": "--xla_cpu_prefer_vector_width=512",
    "fast_runtime": "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME",
    "ynn_dot_fast_runtime": ("--xla_cpu_experimental_ynn_fusion_type=dot "
                             "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME"),
    "concurrency_scheduler": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
}


@dataclasses.dataclass
class Row:
  """One (setting, benchmark figure): its figures from every pass (the table shows medians)."""

  setting: str
  bench: str
  figure: str
  ours: list[float] = dataclasses.field(default_factory=list)
  reference: list[float] = dataclasses.field(default_factory=list)
  error: str = ""


def _number(text: str) -> float:
  return float(text.split()[0].replace(",", ""))


def measure(names: list[str], settings: list[str], repeats: int, tiny: bool,
            timeout: float, logs: pathlib.Path) -> list[Row]:
  """Runs every (repeat, setting, benchmark) and gathers the headline figures."""
  benches = {b.name: b for b in run.CPU_SUITE}
  unknown = [n for n in names if n not in benches or benches[n].module == "compile"]
  if unknown:
    raise ValueError(f"--only: {unknown} are not script benchmarks of the CPU suite "
                     f"({[b.name for b in run.CPU_SUITE if b.module != 'compile']}).")
  bad = [s for s in settings if s not in SETTINGS]
  if bad:
    raise ValueError(f"--settings: {bad} unknown; known: {list(SETTINGS)}.")
  rows: dict[tuple[str, str, str], Row] = {}
  for rep in range(repeats):
    for setting in settings:
      for name in names:
        bench = benches[name]
        where = logs / f"{rep}_{setting}"
        where.mkdir(parents=True, exist_ok=True)
        (job,) = run.plan(bench, "cpu", tiny, where, [])
        job.env["XLA_FLAGS"] = SETTINGS[setting]
        job.env[vigface_jax.ENV_SWITCH] = "1" if setting == PROJECT_DEFAULTS else "0"
        result = run.Result(bench, [job])
        result.outcomes.append(run.execute(job, timeout))
        if result.ok:
          run.collect(result)
        print(f"[{rep}] {setting:24s} {name:10s} "
              + (result.error or "  ".join(f"{h.figure}: {h.ours} vs {h.reference}"
                                           for h in result.headlines)), flush=True)
        if not result.ok:
          row = rows.setdefault((setting, name, "-"), Row(setting, name, "-"))
          row.error = result.error
          continue
        for h in result.headlines:
          row = rows.setdefault((setting, name, h.figure), Row(setting, name, h.figure))
          row.ours.append(_number(h.ours))
          row.reference.append(_number(h.reference))
  return list(rows.values())


def table(rows: list[Row], baseline: str) -> list[str]:
  """Markdown rows: per figure, every setting against the baseline's median."""
  base = {(r.bench, r.figure): statistics.median(r.ours) for r in rows
          if r.setting == baseline and r.ours}
  out = ["| setting | `XLA_FLAGS` | benchmark | figure | passes | ours, images / s "
         "| PyTorch, images / s | ratio (PyTorch time / ours) | ours / baseline's |",
         "|---|---|---|---|---:|---:|---:|---:|---:|"]
  for r in sorted(rows, key=lambda r: (r.bench, r.figure, list(SETTINGS).index(r.setting))):
    flags_text = (f"`{SETTINGS[r.setting]}`" if SETTINGS[r.setting] else
                  f"vigface_jax's: `{' '.join(vigface_jax.CPU_XLA_FLAGS)}`"
                  if r.setting == PROJECT_DEFAULTS else "(none)")
    if r.error:
      out.append(f"| {r.setting} | {flags_text} | `{r.bench}` | failed: {r.error} | | | | | |")
      continue
    ours, ref = statistics.median(r.ours), statistics.median(r.reference)
    vs = base.get((r.bench, r.figure))
    out.append(f"| {r.setting} | {flags_text} | `{r.bench}` | {r.figure} | {len(r.ours)} | "
               f"{ours:.2f} | "
               f"{ref:.2f} | **{ours / ref:.2f}** | "
               f"{'' if vs is None else f'{ours / vs:.2f}'} |")
  return out


def parse_args(argv: list[str]) -> argparse.Namespace:
  """argparse, as `run.py`: the benchmark modules imported define absl flags of their own."""
  p = argparse.ArgumentParser(prog="python -m benchmarks.xla_flags", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", default="fr_demo,dit_demo", help="CPU-suite benchmarks to run.")
  p.add_argument("--settings", default=",".join(SETTINGS),
                 help="settings of SETTINGS to compare; the first is the baseline.")
  p.add_argument("--repeats", type=int, default=1, help="interleaved passes over all settings")
  p.add_argument("--tiny", action="store_true", help="each benchmark at its smallest sizes")
  p.add_argument("--timeout", type=float, default=900.0, help="seconds per benchmark run")
  p.add_argument("--write", action="store_true", help="write the section into --output")
  p.add_argument("--output", default="BENCHMARKS.md", help="markdown file for --write")
  p.add_argument("--json", default=None, help="also write the rows as JSON here")
  p.add_argument("--from_json", default=None,
                 help="render the table from an earlier run's --json instead of running")
  return p.parse_args(argv)


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  settings = args.settings.split(",")
  # The machine line without starting a backend here: the benchmarks run in subprocesses.
  info = data_pipeline.machine(start_backend=False)
  if args.from_json:  # an earlier run: its own machine line, settings and repeats
    record = json.loads(pathlib.Path(args.from_json).read_text("utf-8"))
    info, settings, args.repeats = record["machine"], record["settings"], record["repeats"]
    rows = [Row(**r) for r in record["rows"]]
    argv = [a for a in record["argv"] if not a.startswith("--json")]
  else:
    with tempfile.TemporaryDirectory(prefix="xla_flags_") as tmp:
      rows = measure(args.only.split(","), settings, args.repeats, args.tiny, args.timeout,
                     pathlib.Path(tmp))
    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
  sys.argv = ["xla_flags", *argv]  # section_header names this command line (or the run's)
  lines = [*data_pipeline.section_header(SECTION, "benchmarks.xla_flags", info),
           f"Median over each setting's passes ({args.repeats} interleaved pass(es) of the list; "
           "`passes` per row); each benchmark is the CPU suite's (its command line in its own "
           "section), run with only `XLA_FLAGS` changed.", "",
           *table(rows, settings[0]), ""]
  text = "\n".join(lines)
  print(text)
  if args.json:
    record = {"machine": info, "argv": argv, "settings": settings, "repeats": args.repeats,
              "rows": [dataclasses.asdict(r) for r in rows]}
    pathlib.Path(args.json).write_text(json.dumps(record, indent=1), encoding="utf-8")
  if args.write:
    data_pipeline.write_output(args.output, text, SECTION)
  return 1 if any(r.error for r in rows if r.setting == settings[0]) else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
