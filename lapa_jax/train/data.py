"""The stages' side of the input pipelines: what must be agreed across processes before reading.

    statistics = data.shared_statistics(config.data)        # read once, on process 0
    iterator = pipelines.pair_iterator(config.data, ..., statistics_by_name=statistics)

The data code (lapa_jax/data) never imports JAX, so the multi-host coordination it needs lives here:
dataset statistics (a full pass over each dataset the first time) are computed by process 0 only
and sent to the others, instead of every host reading every dataset. Files other processes must
read (action bins) are written by process 0 before a barrier.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from lapa_jax.data import pipelines


def broadcast_json(make_value: Callable[[], Any], name: str) -> Any:
  """`make_value()` run on process 0 and sent to every process as JSON.

  An exception on process 0 is sent too and raised everywhere with its message, so the other
  processes never wait for a value that will not come.
  """
  value = error = None
  if jax.process_index() == 0:
    try:
      value = make_value()
    except Exception as caught:  # re-raised below, on every process
      error = caught
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return value
  payload = json.dumps({'value': value} if error is None else
                       {'error': str(error), 'type': type(error).__name__}).encode()
  size = int(multihost_utils.broadcast_one_to_all(np.array(len(payload), np.int64)))
  buffer = np.zeros(size, np.uint8)
  if jax.process_index() == 0:
    buffer[:] = np.frombuffer(payload, np.uint8)
  message = json.loads(bytes(multihost_utils.broadcast_one_to_all(buffer)))
  if 'error' in message:
    if error is not None:
      raise error
    raise pipelines.DataError(f'{name} (process 0): {message["error"]}')
  return message['value']


def shared_statistics(data_config, *, progress: bool = True) -> dict[str, dict]:
  """{dataset: statistics} of the pipeline `data_config` describes, computed (or read from its cache)
  once on process 0 and the same on every process."""
  return broadcast_json(lambda: pipelines.dataset_statistics(data_config, progress=progress), 'dataset statistics')


def barrier(name: str) -> None:
  """Waits until every process reaches `name` (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def for_split(data_config, split: str):
  """`data_config` reading `split` instead, e.g. the held-out split of an evaluation. Its proportions
  go by episodes rather than transitions, so the split needs no statistics pass of its own."""
  data = data_config.copy_and_resolve_references()
  if split != data.split and data.balance == 'transitions':
    data.balance = 'episodes'
  data.split = split
  return data


def local_batch_size(batch_size: int, process_count: int) -> int:
  """This process's share of a global batch; a one-line error when it does not divide."""
  if batch_size % process_count:
    raise ValueError(f'batch size {batch_size} is not divisible by the {process_count} processes')
  return batch_size // process_count
