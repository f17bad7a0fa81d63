"""Equal-frequency action bins: continuous actions <-> per-dimension token ids (numpy + json only).

    bins = actions.fit(train_actions, num_bins=256)   # train_actions: (examples, dims) float
    ids = bins.encode(batch_actions)                  # (..., dims) int32, ids[..., d] < bins.num_bins[d]
    decoded = bins.decode(ids)                        # (..., dims) float32, a value inside each id's bin
    bins.save(os.path.join(workdir, actions.BINS_FILE)); bins = actions.load(path)

Each dimension d has `edges[d]` (non-decreasing, num_bins[d] + 1 floats) and `values[d]`, the median
of the training values that fell in each bin, so a decoded value always lies inside its bin.

The official LAPA bins with `pd.qcut(values, q=256, duplicates='drop')` and decodes the gripper with
`int(raw)`, which breaks -1/1 grippers. Here the edges are the 'lower' quantiles (training values,
so no bin is empty and every bin has a median) at linspace(0, 1, num_bins + 1), duplicates merged.
A dimension with at most num_bins distinct values instead gets one bin per value, edges at the
midpoints: a binary gripper in any convention ({0, 1}, {-1, 1}, ...) or a constant dimension then
round-trips exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

BINS_FILE = 'action_bins.json'
FORMAT = 1


def _check(edges, values, counts) -> None:
  if not edges or not (len(edges) == len(values) == len(counts)):
    raise ValueError(f'ActionBins: need the same number (>= 1) of edges, values and counts per '
                     f'dimension, got {len(edges)}, {len(values)}, {len(counts)}')
  for dim, (edge, value, count) in enumerate(zip(edges, values, counts)):
    if not (edge.ndim == value.ndim == count.ndim == 1 and value.size >= 1
            and edge.size == value.size + 1 == count.size + 1):
      raise ValueError(f'ActionBins: dimension {dim} has {edge.size} edges for {value.size} values and '
                       f'{count.size} counts (need bins + 1 edges, bins values and counts)')
    if not (np.all(np.isfinite(edge)) and np.all(np.isfinite(value)) and np.all(np.diff(edge) >= 0)):
      raise ValueError(f'ActionBins: dimension {dim} has non-finite values or decreasing edges')


@dataclasses.dataclass(frozen=True, eq=False)
class ActionBins:
  """Per-dimension bins: `edges[d]` (bins_d + 1,), `values[d]` and `counts[d]` (bins_d,)."""
  edges: tuple[np.ndarray, ...]
  values: tuple[np.ndarray, ...]
  counts: tuple[np.ndarray, ...]
  num_bins_requested: int = 256

  def __post_init__(self):
    for name, dtype in (('edges', np.float64), ('values', np.float64), ('counts', np.int64)):
      arrays = tuple(np.array(a, dtype) for a in getattr(self, name))
      for array in arrays:
        array.setflags(write=False)
      object.__setattr__(self, name, arrays)
    _check(self.edges, self.values, self.counts)

  @property
  def dims(self) -> int:
    return len(self.edges)

  @property
  def num_bins(self) -> tuple[int, ...]:
    return tuple(v.size for v in self.values)

  @property
  def vocab_size(self) -> int:
    """Ids per dimension a token vocabulary must cover: the most bins of any dimension."""
    return max(self.num_bins)

  def bin_widths(self) -> tuple[np.ndarray, ...]:
    """(bins_d,) widths of each dimension's bins (0 for a constant dimension's single bin)."""
    return tuple(np.diff(e) for e in self.edges)

  def max_error(self) -> np.ndarray:
    """(dims,) the largest |decode(encode(x)) - x| for x between a dimension's first and last edge."""
    return np.array([np.max(np.maximum(v - e[:-1], e[1:] - v)) for e, v in zip(self.edges, self.values)])

  def _check_dims(self, array: np.ndarray, what: str) -> None:
    if array.ndim < 1 or array.shape[-1] != self.dims:
      raise ValueError(f'{what}: expected shape (..., {self.dims}), got {array.shape}')

  def encode(self, actions) -> np.ndarray:
    """(..., dims) float actions -> (..., dims) int32 ids: edges[i] <= value < edges[i + 1], clamped."""
    actions = np.asarray(actions, np.float64)
    self._check_dims(actions, 'encode')
    if not np.all(np.isfinite(actions)):
      bad = np.flatnonzero(~np.all(np.isfinite(actions.reshape(-1, self.dims)), axis=0))
      raise ValueError(f'encode: non-finite action values in dimension(s) {bad.tolist()}')
    ids = np.empty(actions.shape, np.int32)
    for dim, edges in enumerate(self.edges):
      # side='right' puts a value equal to an edge in the bin that edge opens.
      found = np.searchsorted(edges, actions[..., dim], side='right') - 1
      ids[..., dim] = np.clip(found, 0, edges.size - 2)
    return ids

  def decode(self, ids) -> np.ndarray:
    """(..., dims) integer ids -> (..., dims) float32 bin values; an id outside a bin range raises."""
    ids = np.asarray(ids)
    self._check_dims(ids, 'decode')
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f'decode: expected integer ids, got dtype {ids.dtype}')
    ids = ids.astype(np.int64)
    for dim, count in enumerate(self.num_bins):
      column = ids[..., dim]
      if column.size and (column.min() < 0 or column.max() >= count):
        bad = column[(column < 0) | (column >= count)].flat[0]
        raise ValueError(f'decode: id {bad} out of range for dimension {dim}, which has {count} bins')
    table = np.zeros((self.dims, self.vocab_size), np.float64)
    for dim, values in enumerate(self.values):
      table[dim, :values.size] = values
    return table[np.arange(self.dims), ids].astype(np.float32)

  def to_json(self) -> dict:
    return {'format': FORMAT, 'num_bins_requested': int(self.num_bins_requested),
            'edges': [e.tolist() for e in self.edges], 'values': [v.tolist() for v in self.values],
            'counts': [c.tolist() for c in self.counts]}

  def save(self, path: str) -> str:
    """Writes the bins as JSON to `path` (atomically, via `path.tmp`); returns `path`."""
    with open(path + '.tmp', 'w') as f:
      json.dump(self.to_json(), f)
    os.replace(path + '.tmp', path)
    return path


def _fit_dimension(column: np.ndarray, num_bins: int):
  ordered = np.sort(column)
  distinct, counts = np.unique(ordered, return_counts=True)
  if distinct.size <= num_bins:
    edges = np.concatenate([distinct[:1], (distinct[:-1] + distinct[1:]) / 2, distinct[-1:]])
    return edges, distinct, counts
  size = ordered.size
  # 'lower' quantiles in integer arithmetic: every edge is a training value, so no bin is empty.
  edges = np.unique(ordered[np.arange(num_bins + 1) * (size - 1) // num_bins])
  starts = np.searchsorted(ordered, edges[:-1], side='left')
  counts = np.diff(np.append(starts, size))
  medians = (ordered[starts + (counts - 1) // 2] + ordered[starts + counts // 2]) / 2
  return edges, medians, counts


def fit(actions, num_bins: int = 256) -> ActionBins:
  """Equal-frequency bins of `(examples, dims)` training actions, at most `num_bins` per dimension."""
  actions = np.asarray(actions, np.float64)
  if int(num_bins) != num_bins or num_bins < 2:
    raise ValueError(f'fit: num_bins must be an integer >= 2, got {num_bins}')
  if actions.ndim != 2 or actions.shape[0] == 0 or actions.shape[1] == 0:
    raise ValueError(f'fit: expected a non-empty (examples, dims) array of actions, got {actions.shape}')
  finite = np.isfinite(actions)
  if not finite.all():
    rows = int(np.sum(~finite.all(axis=1)))
    dims = np.flatnonzero(~finite.all(axis=0)).tolist()
    raise ValueError(f'fit: {rows} of {actions.shape[0]} action rows have NaN or inf values (dimension(s) '
                     f'{dims}); drop or fix them before fitting')
  fitted = [_fit_dimension(actions[:, dim], int(num_bins)) for dim in range(actions.shape[1])]
  edges, values, counts = zip(*fitted)
  return ActionBins(edges, values, counts, int(num_bins))


def from_json(payload, source: str = 'action bins') -> ActionBins:
  """The bins of `ActionBins.to_json()`'s value; `source` names it in errors."""
  if not isinstance(payload, dict) or payload.get('format') != FORMAT:
    found = payload.get('format') if isinstance(payload, dict) else type(payload).__name__
    raise ValueError(f'{source}: expected action bins format {FORMAT}, got {found!r}')
  missing = {'edges', 'values', 'counts', 'num_bins_requested'} - set(payload)
  if missing:
    raise ValueError(f'{source}: action bins file lacks {sorted(missing)}')
  try:
    return ActionBins(tuple(payload['edges']), tuple(payload['values']), tuple(payload['counts']),
                      int(payload['num_bins_requested']))
  except (TypeError, ValueError) as error:
    raise ValueError(f'{source}: invalid action bins ({error})') from None


def load(path: str) -> ActionBins:
  """The bins `ActionBins.save` wrote to `path`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'action bins file {path!r} does not exist (write one with fit(...).save)')
  try:
    with open(path) as f:
      payload = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f'{path}: not an action bins JSON file ({error})') from None
  return from_json(payload, path)
