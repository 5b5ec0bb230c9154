"""Which config fields code reads: a recorder over `ml_collections.ConfigDict` lookups.

`recording(config)` patches `ConfigDict.__getitem__` (attribute access, `.get`, `items()` and
dotted keys all go through it) for the duration of a `with` block and records, for every
lookup on `config` or one of its sections, the dotted path looked up and whether the config
declares it. Tests use it to prove that a task's `validate` reads every declared field and
that running a task reads no field the config does not declare.
"""

from __future__ import annotations

import contextlib
import dataclasses

from ml_collections import config_dict


def declared(config: config_dict.ConfigDict, prefix: str = "") -> set[str]:
  """Dotted paths of every leaf field (a section's fields, not the section itself)."""
  out = set()
  for key, value in config.items():
    path = prefix + key
    if isinstance(value, config_dict.ConfigDict):
      out |= declared(value, path + ".")
    else:
      out.add(path)
  return out


@dataclasses.dataclass
class Record:
  read: set[str] = dataclasses.field(default_factory=set)
  missing: set[str] = dataclasses.field(default_factory=set)


def _paths(config: config_dict.ConfigDict, prefix: str, out: dict[int, str]) -> None:
  out[id(config)] = prefix
  for key, value in config.items():
    if isinstance(value, config_dict.ConfigDict):
      _paths(value, prefix + key + ".", out)


@contextlib.contextmanager
def recording(config: config_dict.ConfigDict):
  """Yields a `Record` of the lookups on `config` (and its sections) inside the block."""
  paths: dict[int, str] = {}
  _paths(config, "", paths)
  record = Record()
  original = config_dict.ConfigDict.__getitem__

  def getitem(self, key):
    prefix = paths.get(id(self))
    try:
      value = original(self, key)
    except KeyError:
      if prefix is not None and isinstance(key, str):
        record.missing.add(prefix + key)
      raise
    if prefix is not None and isinstance(key, str) and "." not in key:
      record.read.add(prefix + key)
    return value

  config_dict.ConfigDict.__getitem__ = getitem
  try:
    yield record
  finally:
    config_dict.ConfigDict.__getitem__ = original
