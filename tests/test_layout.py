"""The package's layout rules: imports run one way, no task imports another, files stay short."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "vigface_jax"
TASK_MODULES = ("vigface_jax.train.fr", "vigface_jax.train.dit", "vigface_jax.preview",
                "vigface_jax.generate.task", "vigface_jax.generate.audit_task",
                "vigface_jax.evaluate.quality")


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def imports(path: pathlib.Path) -> set[str]:
  """Absolute names of the vigface_jax modules `path` imports (`from a import b` → a.b too)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names |= {f"{node.module}.{a.name}" for a in node.names}
  return {n for n in names if n.startswith("vigface_jax")}


def _violations(rule) -> list[str]:
  return [f"{name} imports {target}" for name, path in _modules().items()
          for target in sorted(imports(path)) if rule(name, target)]


def test_models_never_import_the_trainer_and_data_never_imports_evaluate():
  assert not _violations(lambda src, dst: src.startswith("vigface_jax.models")
                         and dst.startswith("vigface_jax.train"))
  assert not _violations(lambda src, dst: src.startswith("vigface_jax.data")
                         and dst.startswith("vigface_jax.evaluate"))


def test_every_registered_task_is_checked_here():
  from vigface_jax import tasks  # pylint: disable=g-import-not-at-top
  assert set(tasks.TASKS.values()) == set(TASK_MODULES)


def test_no_task_module_imports_another():
  assert not _violations(lambda src, dst: src in TASK_MODULES and src != dst
                         and any(dst == t or dst.startswith(t + ".") for t in TASK_MODULES))


def test_the_rules_catch_a_planted_upward_import(tmp_path):
  # The control: the same scan flags a module that imports the trainer from models/.
  planted = tmp_path / "bad.py"
  planted.write_text("from vigface_jax.train import fr as fr_task\nimport vigface_jax.train.dit\n")
  assert imports(planted) >= {"vigface_jax.train.fr", "vigface_jax.train.dit"}


@pytest.mark.parametrize("limit,paths", [(700, None), (350, ["train/dit.py"])])
def test_files_stay_short(limit, paths):
  files = [PACKAGE / p for p in paths] if paths else sorted(PACKAGE.rglob("*.py"))
  long = {str(f.relative_to(PACKAGE)): n for f in files
          if (n := len(f.read_text().splitlines())) > limit}
  assert not long, f"over {limit} lines: {long}"
