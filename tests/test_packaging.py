"""Packaging: the accelerator extras install the jax of requirements.txt, and library code
never chooses a platform (what runs where is the install's and the user's choice)."""

import ast
import pathlib
import re
import subprocess
import sys

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _extras(tmp_path) -> dict[str, list[str]]:
  """setup.py's extras as setuptools writes them (egg_info's requires.txt)."""
  subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
                 cwd=_REPO, check=True, capture_output=True, timeout=120)
  (requires,) = tmp_path.glob("*.egg-info/requires.txt")
  extras, section = {}, None
  for line in requires.read_text().splitlines():
    if line.startswith("["):
      section = line.strip("[]")
      extras[section] = []
    elif line.strip() and section:
      extras[section].append(line.strip())
  return extras


def test_accelerator_extras_pin_the_same_jax(tmp_path):
  (pin,) = [l.split("==")[1] for l in (_REPO / "requirements.txt").read_text().splitlines()
            if l.startswith("jax==")]
  extras = _extras(tmp_path)
  assert extras["tpu"] == [f"jax[tpu]=={pin}"]
  assert extras["cuda"] == [f"jax[cuda13]=={pin}"]
  assert extras["cuda12"] == [f"jax[cuda12]=={pin}"]


# Calls that pick a platform: jax.devices("gpu"), jax.config.update("jax_platforms", ...),
# os.environ["JAX_PLATFORMS"] = ..., jax.default_backend() == "tpu" used to branch.
_PLATFORM_LITERAL = re.compile(r"^(cpu|gpu|tpu|cuda|rocm)$")


def _platform_choices(source: str) -> list[int]:
  lines = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Call):
      name = ast.unparse(node.func)
      args = [a.value for a in node.args if isinstance(a, ast.Constant)]
      if name.endswith(("devices", "local_devices")) and any(
          isinstance(a, str) and _PLATFORM_LITERAL.match(a) for a in args):
        lines.append(node.lineno)
      if name.endswith("config.update") and args and args[0] in ("jax_platforms",
                                                                   "jax_platform_name"):
        lines.append(node.lineno)
    if isinstance(node, ast.Assign):
      for target in node.targets:
        if "JAX_PLATFORMS" in ast.unparse(target):
          lines.append(node.lineno)
  return sorted(lines)


def test_library_code_never_picks_a_platform():
  found = {str(p.relative_to(_REPO)): lines for p in sorted((_REPO / "vigface_jax").rglob("*.py"))
           if (lines := _platform_choices(p.read_text()))}
  assert not found, f"platform chosen in library code (file: lines): {found}"


def test_the_platform_check_catches_a_planted_choice():
  planted = ("import jax, os\nx = jax.devices('gpu')\njax.config.update('jax_platforms', 'tpu')\n"
             "os.environ['JAX_PLATFORMS'] = 'cpu'\ny = jax.devices()\n")
  assert _platform_choices(planted) == [2, 3, 4]
