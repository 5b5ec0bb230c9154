"""Exact nearest-neighbour search by inner product, chunked over queries and sharded over devices.

The privacy audit compares every generated image with every real training image (VIGFace(L):
6M generated images against CASIA's 0.5M), so the search has to be exact, never build the
`[N, M]` similarity matrix on one device, and use every accelerator. How it does that:

* **Gallery sharded.** The gallery `[M, d]` is padded to `M_pad` rows and split row-wise over
  every device of `mesh` (default: a 1-D mesh over `jax.local_devices()`); device `j` holds
  rows `[j·M_loc, (j+1)·M_loc)`. Next to it lives an int32 id per row: the row's index, or -1
  for a padding row. Padding rows score `-inf`, so they can never be returned (the search asks
  for at most `M` candidates).
* **Queries chunked.** Queries go through a host loop of one compiled shape `[Q, d]` (the
  last chunk zero-padded), replicated to every device; the next chunk is dispatched before
  the previous one's results are read back, so the host work overlaps the device work.
* **Per device, the local gallery is scanned in chunks** of `G` rows (`gallery_chunk`), and the
  query chunk in tiles of `T` queries (`query_tile`): each step forms one `[T, G]` product in
  `dtype` (bfloat16 by default) with float32 accumulation (`preferred_element_type=float32`)
  and selects its top k'; one `lax.top_k` over every chunk's candidates then keeps the best k'.
  Only the chunk that holds padding rows masks its product. The devices' candidates
  `[Q, devices·k']` are then merged into the global top-k' inside the same jitted program
  (`jax.shard_map` for the per-device part, `jax.jit` with explicit `NamedSharding`s around it).
* **The selection is two-stage where the chunk allows it** (`G` a multiple of `GROUP` rows and
  at least k' groups): the maximum of each group of `GROUP` consecutive rows, `lax.top_k` of
  those `G / GROUP` maxima, then `lax.top_k` of the `k' · GROUP` products of the chosen groups
  (gathered from the product, in increasing row order). This is exact, ties included: a row in
  the top k' lies in one of the top k' groups ranked by (maximum, lower group first), because
  every group ranked above its own holds a row that ranks above it. On XLA:CPU `lax.top_k`
  costs about 3 ns per element, more than the bfloat16 product itself (BENCHMARKS.md, "Audit
  search"), and the two-stage selection runs it on `1/GROUP` of the elements.
* **The query tile follows the platform** when left at None: 512 queries on CPU (measured best
  with `G` = 32768 on this project's 2-core CPU: 512 x 32768 bfloat16 products and selections
  at about 150 GFLOP/s, against about 100 with 4096 x 32768), the whole query chunk on GPU and
  TPU, where a large product keeps a wide device busy.
* **Ties are deterministic**: `lax.top_k` puts the lower index first, the merge of the chunks'
  candidates keeps earlier (lower-index) chunks first and the device merge keeps devices in
  row order, so equal scores resolve to the lowest gallery index, on any device count. After
  rescoring the host sorts by (-similarity, index), the same rule.
* **Rescoring** (`rescore=True`, the default): bfloat16 products carry a relative error of
  about 2^-8, which can reorder near-ties. The device search therefore returns
  `k' = min(k + margin, M)` candidates per query, the host recomputes their similarities in
  float32 against the float32 gallery and keeps the best k. Reported similarities are then
  float32-exact for the returned indices, and the indices are the exact top-k whenever the true
  top-k is among the bfloat16 top-k' (a miss needs `margin` rows to overtake by bfloat16
  rounding alone). With `dtype=jnp.float32` the device products are float32 throughout.

Cosine similarity is the inner product of L2-normalised rows: pass normalised rows, or
`normalize=True` to have both sides normalised here.

**Memory.** Per device: the gallery shard `M_pad/devices · d · itemsize(dtype)` plus 4 bytes
of row id per row, one query chunk `Q · d · itemsize`, one product `T · G · 4` bytes and the
running candidates `Q · k' · 8` bytes (times ~2 for the merge). Host: the float32 gallery
(kept for rescoring), one chunk's candidates `Q · k' · d · 4` bytes while rescoring, and the
outputs `N · k · 12` bytes. Example, 6M queries × 0.5M gallery × 512-d, 8 devices, Q = 4096,
default G: gallery shard 62,500 × 512 × 2 B = 64 MB, the chunk's product 4096 × 31,250 × 4 B =
512 MB, everything else under 10 MB; the host holds 1 GB of float32 gallery and 72 MB of
results for k = 1 (GPU tiles, `T` = Q). On one device the same search scans 16 chunks of 31,250
rows instead of 2, so the product stays at 512 MB and the gallery shard is 512 MB.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from vigface_jax import ops

# Largest gallery block one device multiplies at once when `gallery_chunk` is None.
DEFAULT_GALLERY_CHUNK = 32768
# Queries per product tile on CPU when `query_tile` is None (elsewhere: the whole query chunk).
CPU_QUERY_TILE = 512
# Rows per group of the two-stage selection; chunks are rounded to a multiple of it.
GROUP = 32
# Extra candidates the device search returns for rescoring to re-sort.
DEFAULT_MARGIN = 8


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _layout(num_rows: int, num_devices: int, gallery_chunk: int | None) -> tuple[int, int]:
  """`(chunks per device, rows per chunk)`: equal chunks of at most `gallery_chunk` rows,
  a multiple of `GROUP` rows where that limit allows (of 8 otherwise)."""
  local = -(-num_rows // num_devices)
  limit = int(gallery_chunk) if gallery_chunk is not None else DEFAULT_GALLERY_CHUNK
  chunks = -(-local // limit)
  rows = -(-local // chunks)
  aligned = _round_up(rows, GROUP)
  return chunks, aligned if aligned <= limit else min(_round_up(rows, 8), limit)


def _check_matrix(x: Any, name: str) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.ndim != 2:
    raise ValueError(f"{name}: expected a 2-D array [rows, dim], got shape {x.shape}; "
                     "reshape it to one embedding per row.")
  if not np.isfinite(x).all():
    bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
    raise ValueError(f"{name}: row {bad} holds NaN or inf; drop or repair non-finite "
                     "embeddings before searching.")
  return x


def _two_stage(rows: int, k: int) -> bool:
  """Whether `_two_stage_top_k` applies to `rows` columns and pays: whole groups, at least k of
  them, and the second stage at most a quarter of the row."""
  return rows % GROUP == 0 and 4 * k * GROUP <= rows


def _two_stage_top_k(s: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k(s, k)`, equal results ties included, from `lax.top_k` of the `GROUP`-row groups'
  maxima and then of the chosen groups' entries (see the module docstring)."""
  n, rows = s.shape
  group_max = s.reshape(n, rows // GROUP, GROUP).max(axis=2)
  _, groups = jax.lax.top_k(group_max, k)
  groups = jnp.sort(groups, axis=1)  # candidates in increasing position: ties stay lower-first
  pos = (groups[:, :, None] * GROUP + jnp.arange(GROUP, dtype=groups.dtype)).reshape(n, -1)
  v, p = jax.lax.top_k(jnp.take_along_axis(s, pos, axis=1), k)
  return v, jnp.take_along_axis(pos, p, axis=1)


class Searcher:
  """A gallery placed on the devices once, searched by any number of query sets.

  Attributes:
    gallery: the padded gallery `[M_pad, d]` in `dtype`, sharded row-wise over the mesh.
    row_ids: int32 `[M_pad]`, the gallery index of each row, -1 for padding rows.
    num_rows: M, the real gallery rows.
    local_rows: rows per device (`M_pad / devices`).
    gallery_chunk: rows of the local gallery multiplied at once (G).
    query_tile: queries multiplied at once (T), None for the whole query chunk.
    platform: the mesh's device platform, which picks the default tiles.
  """

  def __init__(self, gallery: Any, *, mesh: Mesh | None = None, query_chunk: int = 4096,
               gallery_chunk: int | None = None, query_tile: int | None = None,
               dtype: Any = jnp.bfloat16,
               normalize: bool = False, rescore: bool = True, margin: int = DEFAULT_MARGIN,
               progress: bool = False):
    """Pads, casts and shards `gallery`.

    Args:
      gallery: `[M, d]` gallery rows (float; any dtype numpy accepts).
      mesh: the devices to shard the gallery over (every axis: the gallery is split over the
        product of all mesh axes). Default: a 1-D mesh over `jax.local_devices()`.
      query_chunk: queries per compiled call (Q); smaller query sets use one chunk of their
        size rounded up to a power of two (at least 8).
      gallery_chunk: at most this many local gallery rows per product (G). None: at most
        `DEFAULT_GALLERY_CHUNK`. The local shard is split into equal chunks no larger.
      query_tile: queries per product (T), at most the compiled chunk. None: `CPU_QUERY_TILE`
        on CPU, the whole chunk elsewhere.
      dtype: dtype of the products' inputs (accumulation is always float32).
      normalize: L2-normalise gallery and query rows (cosine similarity).
      rescore: recompute the returned candidates' similarities in float32 on the host and
        re-sort (see the module docstring).
      margin: extra candidates searched per query for rescoring.
      progress: show a tqdm progress bar over query chunks.
    """
    g = _check_matrix(gallery, "gallery")
    if g.shape[0] == 0:
      raise ValueError("gallery: no rows; the gallery must hold at least one embedding.")
    if int(query_chunk) < 1:
      raise ValueError(f"query_chunk={query_chunk}: must be a positive number of queries.")
    if gallery_chunk is not None and int(gallery_chunk) < 1:
      raise ValueError(f"gallery_chunk={gallery_chunk}: must be a positive number of rows, or "
                       "None for the default.")
    if query_tile is not None and int(query_tile) < 1:
      raise ValueError(f"query_tile={query_tile}: must be a positive number of queries, or "
                       "None for the platform's default.")
    if int(margin) < 0:
      raise ValueError(f"margin={margin}: must be >= 0 extra candidates.")
    self.normalize = bool(normalize)
    self.rescore = bool(rescore)
    self.margin = int(margin)
    self.query_chunk = int(query_chunk)
    self.progress = bool(progress)
    self.dtype = jnp.dtype(dtype)
    self.host = ops.l2_normalize_np(g) if self.normalize else g
    self.num_rows, self.dim = self.host.shape

    if mesh is None:
      mesh = Mesh(np.asarray(jax.local_devices()), ("gallery",))
    self.mesh = mesh
    self.axes = tuple(mesh.axis_names)
    self.num_devices = int(mesh.devices.size)
    self.platform = mesh.devices.flat[0].platform
    if query_tile is None and self.platform == "cpu":
      query_tile = CPU_QUERY_TILE
    self.query_tile = None if query_tile is None else int(query_tile)
    self.num_chunks, self.gallery_chunk = _layout(self.num_rows, self.num_devices,
                                                  gallery_chunk)
    self.local_rows = self.num_chunks * self.gallery_chunk
    padded_rows = self.local_rows * self.num_devices

    self._replicated = NamedSharding(mesh, PartitionSpec())
    self._row_sharding = NamedSharding(mesh, PartitionSpec(self.axes, None))
    self._id_sharding = NamedSharding(mesh, PartitionSpec(self.axes))
    padded = np.zeros((padded_rows, self.dim), self.dtype)
    padded[:self.num_rows] = self.host.astype(self.dtype)
    ids = np.full((padded_rows,), -1, np.int32)
    ids[:self.num_rows] = np.arange(self.num_rows, dtype=np.int32)
    self.gallery = jax.make_array_from_callback(padded.shape, self._row_sharding,
                                                lambda index: padded[index])
    self.row_ids = jax.make_array_from_callback(ids.shape, self._id_sharding,
                                                lambda index: ids[index])
    self._compiled: dict[tuple[int, int], Callable[..., Any]] = {}

  # ------------------------------------------------------------------ device program

  def _program(self, q_rows: int, kk: int) -> Callable[..., Any]:
    """The jitted search of one `[q_rows, d]` chunk for `kk` candidates (cached)."""
    key = (q_rows, kk)
    if key in self._compiled:
      return self._compiled[key]
    chunks, gc, dim = self.num_chunks, self.gallery_chunk, self.dim
    kc = min(kk, gc)
    select = _two_stage_top_k if _two_stage(gc, kc) else jax.lax.top_k
    tile = q_rows if self.query_tile is None else min(self.query_tile, q_rows)
    tiles = -(-q_rows // tile)
    dims = (((1,), (1,)), ((), ()))

    def scan_gallery(q, g, ids):
      """The top-kk of one `[tile, d]` block of queries over the local chunks."""

      def step(_, block):
        g_block, id_block = block
        s = jax.lax.dot_general(q, g_block, dims, preferred_element_type=jnp.float32)
        # Only a chunk that holds padding rows (the gallery's tail) pays for the mask.
        s = jax.lax.cond(id_block[-1] >= 0, lambda s: s,
                         lambda s: jnp.where(id_block[None, :] >= 0, s, -jnp.inf), s)
        v, p = select(s, kc)
        return None, (v, id_block[p])

      _, (v, i) = jax.lax.scan(step, None, (g, ids))  # [chunks, tile, kc]
      # Chunks in row order: on equal scores the earlier (lower) rows win.
      v = jnp.moveaxis(v, 0, 1).reshape(q.shape[0], -1)
      i = jnp.moveaxis(i, 0, 1).reshape(q.shape[0], -1)
      if v.shape[1] < kk:  # fewer candidates than asked for: pad with rows never returned
        pad = ((0, 0), (0, kk - v.shape[1]))
        v, i = jnp.pad(v, pad, constant_values=-jnp.inf), jnp.pad(i, pad, constant_values=-1)
      v, p = jax.lax.top_k(v, kk)
      return v, jnp.take_along_axis(i, p, axis=1)

    def local(q, g, ids):
      g = g.reshape(chunks, gc, dim)
      ids = ids.reshape(chunks, gc)
      if tiles == 1:
        return scan_gallery(q, g, ids)
      q = jnp.pad(q, ((0, tiles * tile - q_rows), (0, 0))).reshape(tiles, tile, dim)
      v, i = jax.lax.map(lambda block: scan_gallery(block, g, ids), q)
      return v.reshape(-1, kk)[:q_rows], i.reshape(-1, kk)[:q_rows]

    per_device = jax.shard_map(
        local, mesh=self.mesh,
        in_specs=(PartitionSpec(), PartitionSpec(self.axes, None), PartitionSpec(self.axes)),
        out_specs=(PartitionSpec(None, self.axes), PartitionSpec(None, self.axes)))

    def search(q, g, ids):
      v, i = per_device(q, g, ids)  # [Q, devices * kk], devices in row order
      v, p = jax.lax.top_k(v, kk)
      return v, jnp.take_along_axis(i, p, axis=1)

    fn = jax.jit(search,
                 in_shardings=(self._replicated, self._row_sharding, self._id_sharding),
                 out_shardings=(self._replicated, self._replicated))
    self._compiled[key] = fn
    return fn

  # ------------------------------------------------------------------ search

  def __call__(self, queries: Any, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery rows of every query by inner product.

    Args:
      queries: `[N, d]` query rows.
      k: neighbours per query, 1 <= k <= M.

    Returns:
      `(sims float32 [N, k], index int64 [N, k])`, best first; equal similarities in
      increasing gallery index.
    """
    q = _check_matrix(queries, "queries")
    if q.shape[1] != self.dim:
      raise ValueError(f"queries: dimension {q.shape[1]} differs from the gallery's "
                       f"{self.dim}; embed both with the same encoder.")
    k = int(k)
    if not 1 <= k <= self.num_rows:
      raise ValueError(f"k={k}: must be between 1 and the gallery's {self.num_rows} rows.")
    if self.normalize:
      q = ops.l2_normalize_np(q)
    n = q.shape[0]
    if n == 0:
      return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    kk = min(k + self.margin, self.num_rows) if self.rescore else k
    # Fewer queries than a chunk: the next power of two (>= 8), so few shapes ever compile.
    q_rows = min(self.query_chunk, max(8, 1 << (n - 1).bit_length()))
    fn = self._program(q_rows, kk)
    sims = np.empty((n, k), np.float32)
    index = np.empty((n, k), np.int64)
    starts = list(range(0, n, q_rows))
    if self.progress:
      from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
      starts = tqdm.tqdm(starts, desc="nearest", unit="chunk")

    def finish(start, result):
      stop = min(start + q_rows, n)
      v, i = (np.asarray(a)[:stop - start] for a in jax.device_get(result))
      if self.rescore:
        i = i.astype(np.int64)
        v = np.einsum("nd,nkd->nk", q[start:stop], self.host[i], dtype=np.float32)
        order = np.lexsort((i, -v), axis=-1)[:, :k]
        v, i = np.take_along_axis(v, order, 1), np.take_along_axis(i, order, 1)
      sims[start:stop], index[start:stop] = v[:, :k], i[:, :k]

    pending = None
    for start in starts:
      chunk, _ = ops.pad_batch(q[start:start + q_rows], q_rows)
      chunk = jax.device_put(chunk.astype(self.dtype), self._replicated)
      result = fn(chunk, self.gallery, self.row_ids)  # dispatched asynchronously
      if pending is not None:
        finish(*pending)
      pending = (start, result)
    finish(*pending)
    return sims, index


def nearest(queries: Any, gallery: Any, k: int = 1, *, mesh: Mesh | None = None,
            query_chunk: int = 4096, gallery_chunk: int | None = None,
            query_tile: int | None = None, dtype: Any = jnp.bfloat16,
            normalize: bool = False, rescore: bool = True, margin: int = DEFAULT_MARGIN,
            progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k inner-product neighbours of `queries` in `gallery` (see the module docstring).

  Args:
    queries: `[N, d]` query rows.
    gallery: `[M, d]` gallery rows.
    k: neighbours per query, 1 <= k <= M.
    mesh: devices to shard the gallery over; default a 1-D mesh over the local devices.
    query_chunk: queries per compiled call.
    gallery_chunk: at most this many local gallery rows per product (None: 32768).
    query_tile: queries per product (None: the platform's).
    dtype: product input dtype (float32 accumulation).
    normalize: L2-normalise both sides first (cosine similarity).
    rescore: float32 rescoring of `k + margin` candidates on the host.
    margin: extra candidates for rescoring.
    progress: tqdm progress bar over query chunks.

  Returns:
    `(sims float32 [N, k], index int64 [N, k])`, best first, ties in increasing index.
  """
  searcher = Searcher(gallery, mesh=mesh, query_chunk=query_chunk, gallery_chunk=gallery_chunk,
                      query_tile=query_tile, dtype=dtype, normalize=normalize, rescore=rescore,
                      margin=margin, progress=progress)
  return searcher(queries, k)


def padded_rows(num_rows: int, num_devices: int, gallery_chunk: int | None = None) -> int:
  """`M_pad`, the padded gallery size `Searcher` uses for `num_rows` rows on `num_devices`."""
  chunks, rows = _layout(int(num_rows), int(num_devices), gallery_chunk)
  return chunks * rows * int(num_devices)


