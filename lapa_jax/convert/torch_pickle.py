"""Reads PyTorch checkpoints (`torch.save` zip files) into numpy arrays, without PyTorch.

A `.pt` file is a zip archive: `<name>/data.pkl` pickles the object, and every tensor storage is a
raw little-endian file `<name>/data/<key>`. Tensors are pickled as calls of
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` whose storage is a persistent
id `('storage', <dtype>Storage, key, device, numel)`. This module unpickles with an allow-list of
those few names only, so a checkpoint can never run code, and rebuilds each tensor as a numpy array.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class _StorageType:
  def __init__(self, name: str):
    self.dtype = np.dtype(STORAGE_DTYPES[name])


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *unused) -> np.ndarray:
  if not size:
    return storage[offset:offset + 1].reshape(()).copy()
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * itemsize for s in stride), writeable=False)
  return np.array(view)


def _rebuild_parameter(data: np.ndarray, *unused) -> np.ndarray:
  return data


class _Unpickler(pickle.Unpickler):

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
    super().__init__(file)
    self._archive, self._prefix, self._path = archive, prefix, path
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str):
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
      return _rebuild_tensor
    if (module, name) == ('torch._utils', '_rebuild_parameter'):
      return _rebuild_parameter
    if module == 'torch' and name in STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(f'{self._path}: unsupported object {module}.{name} in the checkpoint '
                                 '(only state dicts of tensors can be read without PyTorch)')

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and pid and pid[0] == 'storage'):
      raise pickle.UnpicklingError(f'{self._path}: unexpected persistent id {pid!r}')
    _, storage_type, key, _device, numel = pid
    if key not in self._storages:
      raw = self._archive.read(f'{self._prefix}data/{key}')
      self._storages[key] = np.frombuffer(raw, dtype=storage_type.dtype.newbyteorder('<'), count=numel)
    return self._storages[key]


def load(path: str) -> Any:
  """Unpickles a `torch.save` zip checkpoint; tensors become numpy arrays (copies, native byte order)."""
  if not zipfile.is_zipfile(path):
    raise ValueError(f'{path}: not a PyTorch zip checkpoint (files from torch.save since PyTorch 1.6 are zips)')
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith('/data.pkl') or n == 'data.pkl']
    if len(pickles) != 1:
      raise ValueError(f'{path}: expected one data.pkl in the archive, found {len(pickles)}')
    prefix = pickles[0][:-len('data.pkl')]
    byteorder = f'{prefix}byteorder'
    if byteorder in archive.namelist() and archive.read(byteorder).decode().strip() != 'little':
      raise ValueError(f'{path}: big-endian checkpoints are not supported')
    with archive.open(pickles[0]) as f:
      obj = _Unpickler(f, archive, prefix, path).load()
  return _to_native(obj)


def _to_native(obj):
  if isinstance(obj, np.ndarray):
    return obj.astype(obj.dtype.newbyteorder('='), copy=False)
  if isinstance(obj, dict):
    return {k: _to_native(v) for k, v in obj.items()}
  return obj
