"""A weight-pruned network's mask and its sparse form, saved beside its dense θ.

`runs.saved_params` keeps every saved cycle's θ as an orbax checkpoint of the
*dense* arrays, the pruned weights exactly 0: what `torch.nn.utils.prune.remove`
leaves, so any code that evaluates a dense network evaluates it unchanged. For a
weight-pruned network two files go beside that checkpoint:

  `<checkpoint>.mask.npz`    the weight mask (`pruning.weight_masks`: one 0/1
                             array per prunable leaf, stored as bool), because a
                             kept weight may be 0 too, so the zeros alone do not
                             say which weights were pruned;
  `<checkpoint>.sparse.npz`  the network in sparse form, compressed: per masked
                             leaf the values of its kept weights and where they
                             are, as flat indices (the smallest unsigned integer
                             type that holds them) or, when that is smaller, a
                             bitmap of one bit per weight (nothing for a leaf with
                             every weight kept); every other leaf (biases,
                             batch-norm parameters and statistics) dense.
                             It rebuilds the dense θ and the mask exactly
                             (`read_sparse`); its size on disk is the pruned
                             network's size.
  `<checkpoint>.sizes.json`  bytes on disk of the dense checkpoint (orbax's files,
                             which compress runs of zeros too), of θ's arrays
                             uncompressed (raw_bytes), of the mask and of the sparse
                             form, with the kept and total counts.

Leaf names are θ's '/'-joined paths with the collection first ('params/Dense_0/
kernel', 'batch_stats/bn0/mean'), the mask's names being those of the params tree.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from dropnet_jax import theta as theta_lib
from dropnet_jax.pruning.weight_masks import named_leaves

MASK_SUFFIX, SPARSE_SUFFIX, SIZES_SUFFIX = '.mask.npz', '.sparse.npz', '.sizes.json'


def _flat_theta(theta: Any) -> dict[str, np.ndarray]:
  variables = theta_lib.variables(theta)
  return {name: np.asarray(v) for name, v in named_leaves(variables).items()}


def unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  """The nested tree of {'a/b/c': array} ('/'-joined paths)."""
  out: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, last = name.split('/')
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = value
  return out


def _index_dtype(size: int) -> np.dtype:
  for dtype in (np.uint8, np.uint16, np.uint32):
    if size <= np.iinfo(dtype).max + 1:
      return np.dtype(dtype)
  return np.dtype(np.uint64)


def _tree_bytes(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(path) for n in names)


def write(path: str, theta: Any, weight_mask: Any) -> dict[str, Any]:
  """Writes the mask, the sparse form and the sizes beside the checkpoint `path`; returns the sizes."""
  flat = _flat_theta(theta)
  masks = {f'{theta_lib.PARAMS}/{n}': np.asarray(m) > 0 for n, m in named_leaves(weight_mask).items()}
  missing = sorted(set(masks) - set(flat))
  if missing:
    raise ValueError(f'weight mask leaves {missing} are not in θ')
  arrays: dict[str, np.ndarray] = {}
  for name, value in flat.items():
    if name in masks:
      keep = masks[name].reshape(-1)
      index = np.flatnonzero(keep).astype(_index_dtype(keep.size))
      if keep.all():  # neither: every weight kept
        pass
      elif index.nbytes <= (keep.size + 7) // 8:  # few kept: their indices
        arrays[f'index:{name}'] = index
      else:  # many kept: a bitmap (one bit per weight) is smaller than their indices
        arrays[f'bits:{name}'] = np.packbits(keep)
      arrays[f'value:{name}'] = value.reshape(-1)[keep]
      arrays[f'shape:{name}'] = np.asarray(value.shape, np.int64)
    else:
      arrays[f'dense:{name}'] = value
  with open(path + SPARSE_SUFFIX, 'wb') as f:
    np.savez_compressed(f, **arrays)
  with open(path + MASK_SUFFIX, 'wb') as f:
    np.savez_compressed(f, **masks)
  kept = sum(int(m.sum()) for m in masks.values())
  prunable = sum(int(m.size) for m in masks.values())
  total = sum(int(v.size) for n, v in flat.items() if not n.startswith(theta_lib.BATCH_STATS + '/'))
  sizes = {'dense_bytes': _tree_bytes(path), 'raw_bytes': sum(int(v.nbytes) for v in flat.values()),
           'sparse_bytes': os.path.getsize(path + SPARSE_SUFFIX),
           'mask_bytes': os.path.getsize(path + MASK_SUFFIX), 'prunable_params': prunable, 'prunable_kept': kept,
           'params': total, 'params_kept': total - (prunable - kept), 'nonzero_params': sum(
               int(np.count_nonzero(v)) for n, v in flat.items() if not n.startswith(theta_lib.BATCH_STATS + '/'))}
  with open(path + SIZES_SUFFIX, 'w') as f:
    json.dump(sizes, f, indent=1)
  return sizes


def _theta_like(flat: dict[str, Any]) -> Any:
  """θ in the saved form: a bare params tree, or {'params', 'batch_stats'} when statistics were saved."""
  tree = unflatten(flat)
  return tree if theta_lib.BATCH_STATS in tree else tree[theta_lib.PARAMS]


def _mask_tree(masks: dict[str, np.ndarray]) -> Any:
  prefix = theta_lib.PARAMS + '/'
  return unflatten({n[len(prefix):]: np.asarray(m, np.float32) for n, m in masks.items()})


def read_mask(path: str) -> Any | None:
  """The weight mask saved beside the checkpoint `path` (float32 0/1 arrays), or None if none was saved."""
  if not os.path.isfile(path + MASK_SUFFIX):
    return None
  with np.load(path + MASK_SUFFIX) as f:
    return _mask_tree({n: f[n] for n in f.files})


def read_sparse(path: str) -> tuple[Any, Any]:
  """(θ, weight mask) rebuilt from the sparse form beside the checkpoint `path` (pruned weights 0)."""
  flat, masks = {}, {}
  with np.load(path + SPARSE_SUFFIX) as f:
    for key in f.files:
      kind, name = key.split(':', 1)
      if kind == 'dense':
        flat[name] = f[key]
      elif kind == 'shape':
        shape, value = tuple(int(s) for s in f[key]), f[f'value:{name}']
        size = int(np.prod(shape))
        if f'index:{name}' in f.files:
          index = f[f'index:{name}']
        elif f'bits:{name}' in f.files:
          index = np.flatnonzero(np.unpackbits(f[f'bits:{name}'], count=size))
        else:
          index = np.arange(size)
        dense, keep = np.zeros(size, value.dtype), np.zeros(size, bool)
        dense[index], keep[index] = value, True
        flat[name], masks[name] = dense.reshape(shape), keep.reshape(shape)
  return _theta_like(flat), _mask_tree(masks)


def read_sizes(path: str) -> dict[str, Any] | None:
  """The sizes written beside the checkpoint `path`, or None."""
  try:
    with open(path + SIZES_SUFFIX) as f:
      return json.load(f)
  except FileNotFoundError:
    return None


SUFFIXES = (MASK_SUFFIX, SPARSE_SUFFIX, SIZES_SUFFIX)
