"""The benchmark entry points: `python -m benchmarks.run` runs every benchmark of a suite at tiny
sizes beside its reference and writes one markdown file (a section per benchmark with its
ratio and the machine line), `--dry-run` runs nothing, a failing benchmark is reported as
failed without losing the others (and with a non-zero exit), and `benchmarks/accelerator.sh`'s
CPU form runs end to end and writes its results file.

The children share the tests' persistent compilation cache (`cli_env`) with every compile
cached, eager ones included: at tiny sizes the benchmarks' eager set-up costs more than their
jitted steps.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from benchmarks import run as bench_run
from conftest import cli_env
from conftest import require

_REPO = pathlib.Path(__file__).resolve().parents[1]
_RATIO_HEADER = "ratio (reference time / ours)"


def _env() -> dict[str, str]:
  return dict(cli_env(), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "benchmarks.run", *args], env=_env(), cwd=_REPO,
                        capture_output=True, text=True, timeout=timeout, check=False)


def _section(text: str, heading: str) -> str:
  found = re.search(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
  assert found, f"no section {heading!r} in:\n{text[:3000]}"
  return found.group(0)


def _rows(text: str, name: str) -> list[str]:
  return [l for l in text.splitlines() if l.startswith(f"| `{name}` |")]


def _references():
  require("torch", "the PyTorch references of the benchmarks (pip install -e '.[test]')")
  require("diffusers", "the sampling references of the benchmarks (pip install -e '.[test]')")


def test_fr_step_bfloat16_on_cpu_agrees_within_the_bf16_tolerance(tmp_path):
  """`--dtype=bfloat16 --torch_device=cpu` end to end: bf16 compute on both sides, float32
  weights, step-1 losses within the bf16 tolerance, and the section says so."""
  require("torch", "the PyTorch reference of fr_step (pip install -e '.[test]')")
  md, js = tmp_path / "fr.md", tmp_path / "fr.json"
  # fr_demo's tiny sizes (48x48, 128-d): the smallest the stage-1 benchmark runs at.
  tiny = bench_run._FR_TINY  # pylint: disable=protected-access
  args = [*tiny, "--input_size=48", "--embed_dim=128", "--dtype=bfloat16", "--torch_device=cpu",
          f"--output={md}", f"--json={js}"]
  result = subprocess.run([sys.executable, "-m", "benchmarks.fr_step", *args], env=_env(),
                          cwd=_REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  r = json.loads(js.read_text())["figures"]
  assert r["dtype"] == "bfloat16" and r["torch_device"].startswith("cpu"), r
  assert r["loss_1_tol"] == 2e-2 and r["loss_1_rel"] < 2e-2, r
  section = md.read_text()
  assert "PyTorch on cpu (host CPU); bfloat16 compute" in section, section
  assert "must agree to bfloat16 rounding" in section and "asserted < 0.02" in section, section


def test_dry_run_lists_every_benchmark_and_runs_nothing(tmp_path):
  out = tmp_path / "never.md"
  result = _run("--suite", "cpu", "--dry-run", f"--output={out}", f"--logs={tmp_path / 'logs'}")
  assert result.returncode == 0, result.stderr
  for bench in bench_run.CPU_SUITE:
    assert f"# {bench.name}: " in result.stdout, (bench.name, result.stdout)
    program = "vigface_jax.main" if bench.module == "compile" else f"benchmarks.{bench.module}"
    assert any(program in l and not l.startswith("#") for l in result.stdout.splitlines())
  # The full-size commands are BENCHMARKS.md's documented ones, not the tiny sizes.
  assert "benchmarks.fr_step --variant=r50 --batch=8 --num_classes=2000" in result.stdout
  assert "configs/dit.py:demo --config.dry_run=True" in result.stdout
  assert not out.exists() and not (tmp_path / "logs").exists()


@pytest.fixture(scope="module")
def tiny_cpu_suite(tmp_path_factory):
  _references()
  tmp = tmp_path_factory.mktemp("tiny_cpu_suite")
  out = tmp / "BENCHMARKS.md"
  result = _run("--suite", "cpu", "--tiny", f"--output={out}", f"--logs={tmp / 'logs'}")
  return result, out


def test_tiny_cpu_suite_writes_a_section_per_benchmark_with_ratios(tiny_cpu_suite):
  result, out = tiny_cpu_suite
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  text = out.read_text()
  summary = _section(text, bench_run.SUMMARY)
  assert re.search(r"^Machine: .*jax \d.*; \d{4}-\d\d-\d\d \d\d:\d\d UTC\.", summary,
                   re.MULTILINE), summary
  assert "torch 2." in summary and _RATIO_HEADER in summary
  assert text.index(bench_run.SUMMARY) < min(text.index(b.heading) for b in bench_run.CPU_SUITE)
  for bench in bench_run.CPU_SUITE:
    section = _section(text, bench.heading)
    assert "\nMachine: " in section, bench.name
    assert _RATIO_HEADER in section, bench.name
    rows = _rows(section, bench.name)
    assert rows and rows == _rows(summary, bench.name), (bench.name, rows)
    for row in rows:
      cells = [c.strip() for c in row.split("|")[1:-1]]
      assert cells[1] == "ok", row
      assert re.fullmatch(r"\*\*\d+\.\d\d\*\*", cells[5]), row  # the ratio
      assert re.fullmatch(r"[\d,]+ MiB", cells[7]) and cells[7] != "0 MiB", row  # host memory
  # Each section is its script's own (the command it names), relabelled where needed.
  fr_demo = _section(text, "## Stage-1 training step (IResNet + ArcFace), demo net")
  assert "Produced by `python -m benchmarks.fr_step --variant=small" in fr_demo
  assert "uint8 48x48 images" in fr_demo
  assert "faiss.IndexFlatIP" in text or "`import faiss` failed" in summary


def test_failed_benchmark_is_reported_and_the_others_kept(tmp_path):
  _references()
  out = tmp_path / "out.md"
  fr = bench_run.CPU_SUITE[1]
  assert fr.name == "fr_r50"
  # An earlier run's figures for fr_r50: kept, under a note that this run failed.
  out.write_text(f"# Benchmarks\n\n{fr.heading}\n\nearlier figures: 0.75\n")
  result = _run("--suite", "cpu", "--tiny", "--only=data_pipeline,fr_r50",
                "--append=fr_r50:--variant=no_such_variant", f"--output={out}",
                f"--logs={tmp_path / 'logs'}")
  assert result.returncode == 1, result.stdout + result.stderr
  assert "FAILED: KeyError: 'no_such_variant'" in result.stdout, result.stdout
  text = out.read_text()
  summary = _section(text, bench_run.SUMMARY)
  (row,) = _rows(summary, "fr_r50")
  assert "**failed**: `KeyError: 'no_such_variant'`" in row, row
  assert all("| ok |" in r for r in _rows(summary, "data_pipeline")), summary
  section = _section(text, fr.heading)
  assert bench_run.FAILED_NOTE in section and "earlier figures: 0.75" in section, section
  assert "--variant=no_such_variant" in section
  assert _rows(_section(text, "## Data pipeline (procedural faces)"), "data_pipeline")


def test_unknown_benchmark_exits_nonzero_and_writes_nothing(tmp_path):
  out = tmp_path / "out.md"
  result = _run("--suite", "cpu", "--only=fr_r50,no_such_benchmark", f"--output={out}")
  assert result.returncode == 2
  assert "unknown benchmark(s) no_such_benchmark" in result.stderr
  assert not out.exists()


def test_execute_measures_each_child_and_enforces_its_timeout(tmp_path):
  def run(code: str, name: str) -> bench_run.Run:
    return bench_run.Run([sys.executable, "-c", code], {}, tmp_path / f"{name}.log",
                         tmp_path / f"{name}.err")

  big = bench_run.execute(run("x = b'1' * 300_000_000", "big"), timeout=60)
  small = bench_run.execute(run("pass", "small"), timeout=60)
  assert big.returncode == 0 and not big.error
  # Per child, not the running maximum over all children (RUSAGE_CHILDREN's).
  assert big.maxrss_bytes > 290e6 > 100e6 > small.maxrss_bytes > 0
  slow = bench_run.execute(run("import time; time.sleep(120)", "slow"), timeout=1)
  assert slow.error == "timed out after 1 s" and slow.returncode and slow.wall_s < 60
  crash = bench_run.execute(run("raise ValueError('planted')", "crash"), timeout=60)
  assert crash.returncode == 1 and crash.error == "ValueError: planted"


def test_peak_flops_table_and_faiss_fallback(tmp_path):
  assert bench_run.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert bench_run.peak_flops("NVIDIA H200") == 989e12
  assert bench_run.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
  assert bench_run.peak_flops("TPU v5 lite") == 197e12
  assert bench_run.peak_flops("TPU v5p") == 459e12
  assert bench_run.peak_flops("TPU v4") == 275e12
  for unknown in ("cpu", "NVIDIA H100 PCIe", "TPU v6 lite"):
    assert bench_run.peak_flops(unknown) is None, unknown
  generate = next(b for b in bench_run.CPU_SUITE if b.name == "generate")
  (with_faiss,) = bench_run.plan(generate, "cpu", True, tmp_path, [], faiss_ok=True)
  (without,) = bench_run.plan(generate, "cpu", True, tmp_path, [], faiss_ok=False)
  assert "--parts=generation" in without.argv and "--parts=generation" not in with_faiss.argv


def test_accelerator_script_dry_run_prints_every_command_and_runs_nothing(tmp_path):
  script = str(_REPO / "benchmarks" / "accelerator.sh")
  out = tmp_path / "acc.md"
  for args in ([], ["--cpu"]):
    result = subprocess.run(["bash", script, "--dry-run", f"--out={out}", *args], env=_env(),
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    stdout = result.stdout
    installs = re.findall(r"^\+ .* -m pip install .*-e \.\\?\[(\w+)\\?\]", stdout, re.MULTILINE)
    assert installs == ([] if args else [installs[0]]) and set(installs) <= {
        "cuda", "cuda12", "tpu"}, stdout
    assert re.search(rf"^\+ .* -m benchmarks\.run --suite accelerator --output={out} .*"
                     + ("--tiny" if args else ""), stdout, re.MULTILINE), stdout
    for bench in bench_run.ACCELERATOR_SUITE:
      assert f"# {bench.name}: " in stdout and f"benchmarks.{bench.module} " in stdout
  assert os.listdir(tmp_path) == []


def test_accelerator_script_cpu_form_runs_end_to_end(tmp_path):
  _references()
  out = tmp_path / "acc.md"
  env = _env()
  env.pop("JAX_PLATFORMS", None)  # --cpu sets it
  # One benchmark of the suite (the dry-run test above checks every command it would run).
  result = subprocess.run(["bash", str(_REPO / "benchmarks" / "accelerator.sh"), "--cpu",
                           "--only=fr_r50", f"--out={out}"], env=env, cwd=tmp_path,
                          capture_output=True,
                          text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "1/3 accelerator extra\nskipped (--cpu)" in result.stdout
  text = out.read_text()
  assert text.startswith("# Accelerator benchmarks")
  summary = _section(text, bench_run.SUMMARY)
  assert "\nMachine: " in summary and "| MFU |" in summary
  # What each side ran on, from the script's JSON: bf16 compute, torch 'auto' = cpu here.
  assert "* `fr_r50`: bfloat16; JAX on cpu (cpu), PyTorch on cpu (host CPU)." in summary, summary
  for bench in bench_run.ACCELERATOR_SUITE[:1]:
    assert bench.name == "fr_r50"
    rows = _rows(summary, bench.name)
    assert rows and all("| ok |" in r for r in rows), (bench.name, summary)
    assert "\nMachine: " in _section(text, bench.heading)
  assert os.listdir(tmp_path) == ["acc.md"]  # nothing else left where it ran


_HLO = """HloModule jit_step_fn

%fused_computation.1 (param_0: f32[4,3]) -> f32[4,3] {
  %param_0 = f32[4,3]{1,0} parameter(0)
  ROOT %neg = f32[4,3]{1,0} negate(%param_0), metadata={op_name="jit(step_fn)/transpose(jvp())/neg"}
}

ENTRY %main (p: f32[4,3]) -> (f32[4,3], f32[3,4]) {
  %p = f32[4,3]{1,0} parameter(0)
  %ynn_fusion.7 = f32[4,3]{1,0} fusion(%p), kind=kCustom, calls=%fused_computation.1
  %transpose_copy_fusion.2 = f32[3,4]{1,0} fusion(%p), kind=kLoop, calls=%fused_computation.1, metadata={op_name="jit(step_fn)/jvp()/transpose"}
  %broadcast_add_fusion = f32[4,3]{1,0} fusion(%p), kind=kLoop, calls=%fused_computation.1, metadata={op_name="jit(step_fn)/add"}
  ROOT %tuple = (f32[4,3]{1,0}, f32[3,4]{1,0}) tuple(%ynn_fusion.7, %transpose_copy_fusion.2)
}
"""


def test_profile_classifies_each_xla_op_by_kind_and_pass():
  """The profile's HLO reading: a fusion without metadata takes its computation's (the reverse
  pass here), a layout copy is a copy, the rest of the update is the update."""
  require("torch", "the PyTorch side of profile_step (pip install -e '.[test]')")
  from benchmarks import profile_step  # pylint: disable=g-import-not-at-top
  ops = profile_step.hlo_ops(_HLO)
  assert ops["ynn_fusion.7"] == ("fusion", "jit(step_fn)/transpose(jvp())/neg")
  assert ops["tuple"] == ("tuple", "")
  kinds = {n: profile_step.kind_of(n, op) for n, (op, _) in ops.items()}
  assert kinds["ynn_fusion.7"] == "conv / matmul"
  assert kinds["transpose_copy_fusion.2"] == "layout copies"
  assert kinds["broadcast_add_fusion"] == "elementwise + reductions"
  assert kinds["tuple"] == "other"
  phases = {n: profile_step.phase_of(m) for n, (_, m) in ops.items()}
  assert phases == {"p": "unlabelled", "ynn_fusion.7": "backward", "tuple": "unlabelled",
                    "transpose_copy_fusion.2": "forward", "broadcast_add_fusion": "update",
                    "param_0": "unlabelled", "neg": "backward"}


def test_profile_of_the_demo_step_accounts_for_both_frameworks(tmp_path):
  """`benchmarks.profile_step` at tiny sizes: both profilers ran, the JAX ops it matched to the
  compiled step fill the table, and the section is written where asked, under its heading
  with `--heading`'s note (another size keeps its own section)."""
  require("torch", "the PyTorch side of profile_step (pip install -e '.[test]')")
  md = tmp_path / "profile.md"
  args = [*bench_run._FR_TINY[:3], "--input_size=48", "--embed_dim=128", "--trace_steps=1",  # pylint: disable=protected-access
          f"--output={md}", "--heading=tiny"]
  result = subprocess.run([sys.executable, "-m", "benchmarks.profile_step", *args], env=_env(),
                          cwd=_REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  section = _section(md.read_text(), "## Where the stage-1 step's time goes (profiles), tiny")
  assert "## Where the stage-1 step's time goes (profiles)\n" not in md.read_text()
  conv = re.search(r"^\| conv / matmul \| ([\d.]+) \| ([\d.]+) \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|",
                   section, re.MULTILINE)
  assert conv and float(conv.group(1)) > 0 and float(conv.group(2)) > 0, section
  torch_conv = re.findall(r"^\| conv / matmul \| ([\d.]+) \| \d+% \|$", section, re.MULTILINE)
  assert torch_conv and float(torch_conv[0]) > 0, section
  assert "`aten::" in section and "_fusion" in section, section
  step = re.search(r"against ([\d.]+) ms for the same step timed without the profiler", section)
  assert step and float(step.group(1)) > 0, section
  assert re.search(r"^\| not covered by op events .*\| [\d.]+ \| \d+% \|$", section,
                   re.MULTILINE), section


def test_xla_flags_ab_reports_each_setting_and_a_flag_that_breaks_the_run(tmp_path,
                                                                          monkeypatch):
  """`benchmarks.xla_flags` at tiny sizes: the baseline row carries both sides' figures, and a
  planted setting whose flag XLA rejects is reported as failed, not timed (the control)."""
  _references()
  from benchmarks import xla_flags  # pylint: disable=g-import-not-at-top
  for key, value in _env().items():
    monkeypatch.setenv(key, value)
  monkeypatch.setitem(xla_flags.SETTINGS, "planted_bad", "--xla_cpu_no_such_flag=1")
  rows = xla_flags.measure(["fr_demo"], ["baseline", "planted_bad"], 1, True, 600, tmp_path)
  (base,) = [r for r in rows if r.setting == "baseline"]
  (bad,) = [r for r in rows if r.setting == "planted_bad"]
  assert not base.error and base.ours[0] > 0 and base.reference[0] > 0, base
  assert bad.error and not bad.ours, bad
  text = "\n".join(xla_flags.table(rows, "baseline"))
  assert "| baseline | (none) | `fr_demo` | training step, images / s |" in text, text
  assert "| planted_bad | `--xla_cpu_no_such_flag=1` | `fr_demo` | failed: " in text, text
  (line,) = [l for l in text.splitlines() if l.startswith("| baseline |")]
  cells = line.split("|")
  assert cells[-2].strip() == "1.00", text  # the baseline against itself
  assert cells[-3].strip() == f"**{base.ours[0] / base.reference[0]:.2f}**", text
  with pytest.raises(ValueError, match="no_such_setting"):
    xla_flags.measure(["fr_demo"], ["no_such_setting"], 1, True, 600, tmp_path)


def test_train_loop_benchmark_times_both_settings_and_the_step_alone(tmp_path):
  """`benchmarks.train_loop` on the tiny config: a row with both loop settings, the step alone
  and the ratios of its own medians, written as its section; too few steps is refused."""
  out = tmp_path / "BENCHMARKS.md"
  record = tmp_path / "loop.json"
  cmd = [sys.executable, "-m", "benchmarks.train_loop", "--configs=tiny", "--steps=8",
         "--repeats=1", "--write", f"--output={out}", f"--json={record}"]
  done = subprocess.run(cmd, env=_env(), cwd=_REPO, capture_output=True, text=True,
                        timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  (row,) = json.loads(record.read_text())["rows"]
  before, now, alone = row["before"][0], row["now"][0], row["alone"][0]
  assert min(before, now, alone) > 0, row
  text = _section(out.read_text(), "## Training loop: host reads and overhead")
  assert "python -m benchmarks.train_loop --configs=tiny" in text, text
  (line,) = _rows(text, "tiny")
  cells = [c.strip() for c in line.split("|")]
  assert cells[5] == f"**{now / before:.2f}**" and cells[7] == f"{now / alone:.2f}", line
  refused = subprocess.run(cmd[:3] + ["--configs=tiny", "--steps=4"], env=_env(), cwd=_REPO,
                           capture_output=True, text=True, timeout=120, check=False)
  assert refused.returncode != 0 and "--steps=4" in refused.stderr, refused.stderr[-2000:]
