"""Host data pipelines (tf.data + numpy, never JAX): RLDS reading, LAQ frame pairs, ...

Every training iterator follows `BatchIterator`, so the train loop can checkpoint its position.
Importing this package does not import TensorFlow; the modules that need it do.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class BatchIterator(Protocol):
  """Iterator of host-local batches: dict of numpy arrays whose leading axis is the local batch."""

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...

  def __next__(self) -> dict[str, np.ndarray]: ...

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable data position (saved in checkpoints)."""

  def set_state(self, state: dict[str, Any]) -> None:
    """Continue exactly from `state`: the same batches as an uninterrupted run."""
