"""launch/: every script run in its --dry-run form and for real against stand-in commands.

Stand-in `gcloud`, `sbatch`, `srun`, `scontrol` and `python3` on PATH record their arguments
(and the JAX_* environment) as JSON lines, so a test can check that what a script prints
under --dry-run is exactly what it runs, and that the remote command strings it builds
survive their quoting: the `--command=` a TPU worker would run is run here by bash, in a
stand-in home, and must reach `python3 -m vigface_jax.main` with the arguments given.
`launch/local.sh` is run for real: two JAX processes on 127.0.0.1 must meet.
"""

import json
import os
import pathlib
import shlex
import subprocess
import sys
import textwrap

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]
_LAUNCH = _REPO / "launch"
# Scripts covered below; a new launch/ script must be added here (and get its tests).
_TESTED = {"tpu.sh", "slurm.sh", "local.sh"}
_TIMEOUT_S = 120

_RECORDER = textwrap.dedent("""\
    #!{python}
    import json, os, sys
    name = os.path.basename(sys.argv[0])
    entry = {{"cmd": name, "argv": sys.argv[1:],
              "env": {{k: v for k, v in os.environ.items() if k.startswith(("JAX_", "SLURM_"))}}}}
    if name == "sbatch":
        entry["stdin"] = sys.stdin.read()
    if name == "scontrol":
        print("gpu-node-7\\ngpu-node-8")
    with open(os.environ["LAUNCH_RECORD"], "a") as fh:
        fh.write(json.dumps(entry) + "\\n")
    if name == "srun":  # run the task command once per task, as SLURM would
        import subprocess
        cmd = sys.argv[1:]
        while cmd[0].startswith("--"):  # srun's own options, then the task command
            cmd = cmd[1:]
        for i in range(int(os.environ["SLURM_NTASKS"])):
            env = dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i))
            subprocess.run(cmd, env=env, check=True)
    """)


def test_every_launch_script_is_tested():
  scripts = {p.name for p in _LAUNCH.glob("*.sh") if not p.name.startswith("_")}
  assert scripts == _TESTED, f"untested launch scripts: {scripts - _TESTED}"
  for name in scripts:
    assert os.access(_LAUNCH / name, os.X_OK), f"launch/{name} is not executable"


@pytest.fixture(name="stand_in")
def _stand_in(tmp_path):
  """PATH with recording stand-ins first; returns (env, read_records)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("gcloud", "sbatch", "srun", "scontrol", "python3"):
    path = bin_dir / name
    path.write_text(_RECORDER.format(python=sys.executable))
    path.chmod(0o755)
  record = tmp_path / "record.jsonl"
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "TPU_"))}
  env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", LAUNCH_RECORD=str(record),
             TMPDIR=str(tmp_path))

  def records():
    if not record.exists():
      return []
    return [json.loads(line) for line in record.read_text().splitlines()]
  return env, records


def _run(script, args, env, check=True):
  proc = subprocess.run([str(_LAUNCH / script), *args], env=env, capture_output=True,
                        text=True, timeout=_TIMEOUT_S, check=False)
  if check:
    assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc


def _printed(stdout):
  """The commands a script printed ('+ ' lines), as argument lists."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


_TPU = ["--name=vig-pod", "--zone=us-central2-b", "--project=my-proj", "--type=v4-32"]

_TPU_CASES = {
    "create": ([], "create"),
    "create_queued_spot": (["--queued", "--spot"], "create"),
    "status": ([], "status"),
    "delete": ([], "delete"),
    "delete_queued": (["--queued"], "delete"),
    "pull": (["--git=https://example.org/vigface_jax.git", "--ref=v1"], "pull"),
    "setup": ([], "setup"),
    "run": ([], "run", "--", "--config=configs/dit.py",
            "--config.audit.encoders=('/models/r 100',)", "--workdir=gs://bucket/runs/stage2"),
    "logs": (["--worker=3", "--job=stage2"], "logs"),
    "profile_gs": ([], "profile", "gs://bucket/runs/stage2", "prof"),
    "profile_vm": ([], "profile", "runs/stage2", "prof"),
    "ssh": ([], "ssh", "--", "nvidia-smi || true"),
}


def _tpu_args(case):
  opts, *rest = _TPU_CASES[case]
  return [*_TPU, *opts, *rest]


@pytest.mark.parametrize("case", sorted(_TPU_CASES))
def test_tpu_dry_run_prints_what_it_runs(case, stand_in):
  env, records = stand_in
  dry = _run("tpu.sh", ["--dry-run", *_tpu_args(case)], env)
  assert records() == [], "--dry-run ran a command"
  printed = [c for c in _printed(dry.stdout) if c[0] == "gcloud"]
  assert printed, dry.stdout
  _run("tpu.sh", _tpu_args(case), env)
  assert [r["argv"] for r in records() if r["cmd"] == "gcloud"] == [c[1:] for c in printed]
  for argv in (c[1:] for c in printed):
    if argv[:2] != ["storage", "cp"]:
      assert "--zone=us-central2-b" in argv and "--project=my-proj" in argv, argv


def test_tpu_commands_say_what_gcloud_needs(stand_in):
  env, _ = stand_in
  out = lambda case: _printed(_run("tpu.sh", ["--dry-run", *_tpu_args(case)], env).stdout)
  create = out("create")[0]
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert "--accelerator-type=v4-32" in create and "--version=tpu-ubuntu2204-base" in create
  assert "--spot" not in create
  queued = out("create_queued_spot")[0]
  assert queued[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert {"--node-id=vig-pod", "--runtime-version=tpu-ubuntu2204-base", "--spot"} <= set(queued)
  assert "--force" in out("delete_queued")[0]
  for case in ("setup", "run", "pull", "ssh"):
    ssh = out(case)[0]
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vig-pod"]
    assert "--worker=all" in ssh
  assert "--worker=3" in out("logs")[0]
  setup = next(a for a in out("setup")[0] if a.startswith("--command="))
  assert "pip install" in setup and ".[tpu]" in setup
  assert out("profile_gs")[0] == ["gcloud", "storage", "cp", "-r",
                                  "gs://bucket/runs/stage2/profile", "prof"]


def test_tpu_run_command_reaches_main_with_its_arguments(stand_in, tmp_path):
  """The remote --command string, run by bash in a stand-in home, starts the job with the
  exact arguments (spaces, quotes and parentheses included) and writes the log."""
  env, records = stand_in
  printed = _printed(_run("tpu.sh", ["--dry-run", *_tpu_args("run")], env).stdout)
  remote = next(a for a in printed[0] if a.startswith("--command="))[len("--command="):]
  home = tmp_path / "home"
  (home / "vigface_jax").mkdir(parents=True)
  subprocess.run(["bash", "-c", remote], cwd=home, env=dict(env, HOME=str(home)), check=True,
                 timeout=_TIMEOUT_S)
  job = [r for r in records() if r["cmd"] == "python3"]
  assert [r["argv"] for r in job] == [[
      "-m", "vigface_jax.main", "--config=configs/dit.py",
      "--config.audit.encoders=('/models/r 100',)", "--workdir=gs://bucket/runs/stage2"]]
  assert (home / "vigface_logs" / "vigface.log").exists()


def test_tpu_copy_archives_head(stand_in, tmp_path):
  env, records = stand_in
  if subprocess.run(["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True,
                    check=False).returncode:
    pytest.skip("not a git checkout")
  dry = _run("tpu.sh", ["--dry-run", *_TPU, "copy"], env)
  cmds = _printed(dry.stdout)
  assert cmds[0][:3] == ["git", "-C", str(_REPO)] and cmds[0][3:5] == ["archive",
                                                                         "--format=tar.gz"]
  assert [c[:5] for c in cmds[1:]] == [["gcloud", "compute", "tpus", "tpu-vm", "scp"],
                                       ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
  _run("tpu.sh", [*_TPU, "copy"], env)
  scp = next(r for r in records() if r["argv"][3] == "scp")
  assert scp["argv"][4].endswith(".tar.gz") and scp["argv"][5] == "vig-pod:vigface_jax.tar.gz"
  assert not list(tmp_path.glob("vigface_jax-*.tar.gz")), "the local archive was left behind"


def test_slurm_batch_script_sets_each_process_up(stand_in, tmp_path):
  """The submitted script, run with stand-in scontrol/srun, gives every task the
  coordinator, the process count and its own id, and the job its arguments."""
  env, records = stand_in
  args = ["--nodes=2", "--gpus-per-node=4", "--partition=a100", "--port=23456",
          f"--logs={tmp_path / 'logs'}", "--", "--config=configs/dit.py",
          "--workdir=/runs/it's here"]
  dry = _run("slurm.sh", ["--dry-run", *args], env)
  assert records() == []
  assert "#SBATCH --nodes=2" in dry.stdout and "#SBATCH --partition=a100" in dry.stdout
  assert "#SBATCH --ntasks-per-node=1" in dry.stdout
  _run("slurm.sh", args, env)
  (submitted,) = [r for r in records() if r["cmd"] == "sbatch"]
  assert submitted["stdin"].strip() == dry.stdout.rsplit("+ sbatch", 1)[0].strip()
  batch = tmp_path / "job.sbatch"
  batch.write_text(submitted["stdin"])
  job_env = dict(env, SLURM_JOB_NODELIST="gpu-node-[7-8]", SLURM_NTASKS="2",
                 SLURM_JOB_NUM_NODES="2")
  subprocess.run(["bash", str(batch)], env=job_env, check=True, timeout=_TIMEOUT_S,
                 capture_output=True)
  tasks = [r for r in records() if r["cmd"] == "python3"]
  assert [r["argv"] for r in tasks] == [["-m", "vigface_jax.main", "--config=configs/dit.py",
                                         "--workdir=/runs/it's here"]] * 2
  assert [r["env"]["JAX_PROCESS_ID"] for r in tasks] == ["0", "1"]
  for r in tasks:
    assert r["env"]["JAX_COORDINATOR_ADDRESS"] == "gpu-node-7:23456"
    assert r["env"]["JAX_NUM_PROCESSES"] == "2"
    assert "JAX_LOCAL_DEVICE_IDS" not in r["env"]


def test_slurm_per_gpu_tasks(stand_in):
  env, _ = stand_in
  dry = _run("slurm.sh", ["--dry-run", "--gpus-per-node=8", "--per-gpu", "--", "--config=x"], env)
  assert "#SBATCH --ntasks-per-node=8" in dry.stdout
  assert "JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID" in dry.stdout


@pytest.mark.parametrize("script, args, message", [
    ("tpu.sh", ["create"], "--name"),
    ("tpu.sh", ["--name=x", "create"], "--zone"),
    ("tpu.sh", ["--name=x", "--zone", "us", "create"], "unknown option --zone"),
    ("tpu.sh", ["--name=x", "--zone=z", "--type=v9-8", "create"], "--version"),
    ("tpu.sh", ["--name=x", "--zone=z", "launch"], "unknown command launch"),
    ("tpu.sh", ["--name=x", "--zone=z", "run"], "run needs"),
    ("tpu.sh", ["--name=x", "--zone=z", "--job=a/b", "logs"], "--job"),
    ("tpu.sh", ["--name=x", "--zone=z", "profile", "gs://b"], "profile needs"),
    ("slurm.sh", ["--nodes=0", "--", "--config=x"], "--nodes"),
    ("slurm.sh", ["--gpus-per-node=two", "--", "--config=x"], "--gpus"),
    ("slurm.sh", ["--nodes=2"], "after --"),
    ("slurm.sh", ["--partition", "a100", "--", "--config=x"], "unknown option --partition"),
])
def test_bad_arguments_name_the_problem_and_run_nothing(script, args, message, stand_in):
  env, records = stand_in
  proc = _run(script, args, env, check=False)
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr
  assert records() == []


_PROBE = ("from vigface_jax import parallel; assert parallel.maybe_initialize_distributed(); "
          "import jax; print('process', jax.process_index(), 'of', jax.process_count(), "
          "jax.local_device_count(), jax.device_count())")


def test_local_dry_run_prints_each_process(stand_in):
  env, records = stand_in
  dry = _run("local.sh", ["--dry-run", "--processes=3", "--port=4567", "--",
                          "--config=configs/fr.py:tiny", "--workdir=/tmp/w"], env)
  cmds = _printed(dry.stdout)
  assert [c[3] for c in cmds] == [f"JAX_PROCESS_ID={i}" for i in range(3)]
  for c in cmds:
    assert c[:3] == ["env", "JAX_COORDINATOR_ADDRESS=127.0.0.1:4567", "JAX_NUM_PROCESSES=3"]
    assert c[-4:] == ["-m", "vigface_jax.main", "--config=configs/fr.py:tiny", "--workdir=/tmp/w"]
  assert records() == []


def test_local_starts_processes_that_meet():
  """Two real JAX processes with two CPU devices each: one 4-device job."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env["PYTHONPATH"] = f"{_REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
  proc = subprocess.run([str(_LAUNCH / "local.sh"), "--processes=2", "--devices-per-process=2",
                         "--timeout=100", "--exec", "--", sys.executable, "-c", _PROBE],
                        env=env, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  lines = sorted(l for l in proc.stdout.splitlines() if " process " in l)
  assert lines == ["[p0] process 0 of 2 2 4", "[p1] process 1 of 2 2 4"], proc.stdout


def test_local_failure_and_timeout_stop_the_job():
  env = dict(os.environ)
  failed = subprocess.run([str(_LAUNCH / "local.sh"), "--exec", "--", sys.executable, "-c",
                           "import os, sys, time; os.environ['JAX_PROCESS_ID'] == '1' and "
                           "sys.exit(3); time.sleep(60)"],
                          env=env, capture_output=True, text=True, timeout=_TIMEOUT_S,
                          check=False)
  assert failed.returncode == 3 and "stopping the others" in failed.stderr, failed.stderr
  timed = subprocess.run([str(_LAUNCH / "local.sh"), "--timeout=1", "--exec", "--", "sleep",
                          "60"], env=env, capture_output=True, text=True, timeout=_TIMEOUT_S,
                         check=False)
  assert timed.returncode == 124 and "--timeout=1" in timed.stderr, timed.stderr
