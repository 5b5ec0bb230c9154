"""`on_error='skip'` for file sources: a record that cannot be read is replaced, not dropped.

grain's loader cannot drop a record (a `None` element would break batching), so a bad record is
replaced by the next readable one in source order. The replacement is always the same record,
so runs stay deterministic; each replacement is logged and counted. Many bad records in a row
point to a wrong path or a missing disk rather than a few damaged files, so that raises.
"""

from __future__ import annotations

from typing import Any, Callable

from absl import logging

MAX_CONSECUTIVE_SKIPS = 100


def load_or_replace(load: Callable[[int], Any], index: int, size: int, *,
                    errors: type[Exception] | tuple[type[Exception], ...], name: str,
                    on_replace: Callable[[], int]) -> Any:
  """`load(index)`, or `load` of the next readable record when it raises one of `errors`.

  Args:
    load: reads record `i`.
    index: the record asked for.
    size: number of records (the search wraps around).
    errors: exception types that mean "this record is unreadable".
    name: the source, for messages.
    on_replace: called once per replaced record; returns the running count, for the log.

  Raises:
    The first error's type, when `MAX_CONSECUTIVE_SKIPS` records in a row are unreadable.
  """
  first_error = None
  limit = min(MAX_CONSECUTIVE_SKIPS, size)
  for step in range(limit):
    candidate = (index + step) % size
    try:
      return load(candidate)
    except errors as e:  # pylint: disable=broad-exception-caught
      first_error = first_error or e
      count = on_replace()
      logging.warning("%s: replacing unreadable record %d by the next one (%d replaced in this "
                      "process so far): %s", name, candidate, count, e)
  raise type(first_error)(
      f"{name}: {limit} records in a row from {index} are unreadable (on_error='skip'); "
      f"first: {first_error}") from first_error
