"""PyTorch `.pth`/`.pt` state dicts read into numpy, without importing torch.

Why not `torch.load`: the library must not depend on torch (it is a test-only
oracle here), and unpickling an arbitrary file runs whatever it names. A
`torch.save` file (the zip format, torch >= 1.6) is a zip archive `<name>/data.pkl`
(the pickled object) beside `<name>/data/<key>` (the raw bytes of each storage)
and `<name>/byteorder`. The pickle names a handful of globals to rebuild
tensors; `_Unpickler.find_class` maps exactly these to numpy and refuses
every other global in one line, so reading a file can only build dicts,
lists, numbers, strings and numpy arrays:

  * `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`: the
    tensor is a strided view of its storage (offsets and strides in elements,
    so views and non-contiguous tensors, e.g. a transposed weight sharing its
    storage, come out as torch has them), copied into a contiguous array;
  * `torch._utils._rebuild_parameter(data, ...)` (a state dict saved with
    keep_vars=True): its data;
  * `torch.<Type>Storage` (the dtype of a storage: FloatStorage -> float32,
    DoubleStorage -> float64, LongStorage -> int64, ...), named in each
    storage's persistent id ('storage', type, key, location, numel);
  * `collections.OrderedDict` (what `state_dict()` returns).

The byte order is the archive's `byteorder` entry (little-endian when absent,
as torch assumes); the arrays are returned in native order. Files in torch's
legacy (pre-zip) format are refused with the way out.

`read_state_dict(path)` adds what a checkpoint file usually wraps around the
state dict: a dict with the tensors under 'net' / 'state_dict' /
'model_state_dict' / 'model' (the kuangliu/pytorch-cifar `ckpt.pth` form is
{'net': state_dict, 'acc', 'epoch'}) and the 'module.' prefix that
`nn.DataParallel` puts on every key.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any

import numpy as np

_STORAGE_DTYPES = {
    'DoubleStorage': 'f8', 'FloatStorage': 'f4', 'HalfStorage': 'f2', 'LongStorage': 'i8', 'IntStorage': 'i4',
    'ShortStorage': 'i2', 'CharStorage': 'i1', 'ByteStorage': 'u1', 'BoolStorage': '?',
}
WRAPPER_KEYS = ('net', 'state_dict', 'model_state_dict', 'model')


class PthError(ValueError):
  """A file that is not a readable PyTorch state dict (the message is the whole line)."""


class _StorageType:
  """A `torch.<Type>Storage` class as the pickle names it: only its numpy dtype matters."""

  def __init__(self, name: str, dtype: str):
    self.name, self.dtype = name, dtype


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_unused) -> np.ndarray:
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride):
    raise PthError(f'a tensor of size {size} has strides {stride}')
  if any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
    raise PthError(f'a tensor has a negative size, stride or offset ({size}, {stride}, {offset})')
  if 0 in size:
    return np.zeros(size, storage.dtype.newbyteorder('='))
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise PthError(f'a tensor of size {size}, strides {stride} at offset {offset} reads past its storage '
                   f'of {storage.size} elements')
  view = np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(s * storage.itemsize for s in stride),
                                         writeable=False)
  return np.array(view, dtype=storage.dtype.newbyteorder('='), order='C')  # a copy (ascontiguousarray makes 0-d 1-d)


def _rebuild_parameter(data: np.ndarray, *_unused) -> np.ndarray:
  return data


_GLOBALS = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('collections', 'OrderedDict'): collections.OrderedDict,
}


class _Unpickler(pickle.Unpickler):
  """data.pkl's unpickler: the globals above and storage types only; storages read from the zip."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str, path: str):
    super().__init__(io.BytesIO(data))
    self.archive, self.prefix, self.order, self.path = archive, prefix, '<' if byteorder == 'little' else '>', path
    self.storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _GLOBALS:
      return _GLOBALS[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name, _STORAGE_DTYPES[name])
    if module == 'torch' and name.endswith('Storage'):
      raise PthError(f'{self.path}: tensors of torch.{name} have no numpy dtype (convert them, e.g. .float())')
    raise PthError(f'{self.path}: refusing to unpickle {module}.{name}: only state dicts of tensors are read '
                   '(save model.state_dict(), not the model)')

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage' and isinstance(pid[1], _StorageType)):
      raise PthError(f'{self.path}: unknown persistent id {pid!r:.80}')
    _, storage_type, key, _location, numel = pid
    if key not in self.storages:
      try:
        raw = self.archive.read(f'{self.prefix}data/{key}')
      except KeyError:
        raise PthError(f'{self.path}: storage data/{key} is missing from the archive') from None
      dtype = np.dtype(self.order + storage_type.dtype)
      if len(raw) < numel * dtype.itemsize:
        raise PthError(f'{self.path}: storage data/{key} holds {len(raw)} bytes, {numel} x {dtype} expected')
      self.storages[key] = np.frombuffer(raw, dtype, count=numel)
    return self.storages[key]


def load(path: str) -> Any:
  """The object `torch.save` wrote to `path`, with every tensor a numpy array (see the module docstring)."""
  try:
    archive = zipfile.ZipFile(path)
  except FileNotFoundError:
    raise PthError(f'{path}: no such file') from None
  except zipfile.BadZipFile:
    raise PthError(f'{path}: not a torch.save zip archive (a legacy-format file? re-save it with a current torch: '
                   'torch.save(torch.load(path), path))') from None
  with archive:
    pickles = [n for n in archive.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]
    if len(pickles) != 1:
      raise PthError(f'{path}: not a torch.save archive (no <name>/data.pkl)')
    prefix = pickles[0][:-len('data.pkl')]
    byteorder = 'little'
    if f'{prefix}byteorder' in archive.namelist():
      byteorder = archive.read(f'{prefix}byteorder').decode().strip()
      if byteorder not in ('little', 'big'):
        raise PthError(f'{path}: unknown byte order {byteorder!r}')
    try:
      return _Unpickler(archive.read(pickles[0]), archive, prefix, byteorder, path).load()
    except PthError:
      raise
    except Exception as e:  # a damaged pickle: one line
      raise PthError(f'{path}: cannot read data.pkl ({type(e).__name__}: {e})') from None


def _is_state_dict(obj: Any) -> bool:
  return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, np.ndarray)
                                                     for k, v in obj.items())


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{name: array} of the state dict in `path` (unwrapped from a checkpoint dict, 'module.' stripped)."""
  obj = load(path)
  if isinstance(obj, dict) and not _is_state_dict(obj):
    inner = [k for k in WRAPPER_KEYS if _is_state_dict(obj.get(k))]
    if inner:
      obj = obj[inner[0]]
  if not _is_state_dict(obj):
    keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise PthError(f'{path}: not a state dict of tensors (found {keys}; tensors are read from the file itself '
                   f'or under one of {WRAPPER_KEYS})')
  state = dict(obj)
  if all(k.startswith('module.') for k in state):
    state = {k[len('module.'):]: v for k, v in state.items()}
  return state
