"""Weight-granularity masks: selection, application, masked updates, sparsity accounting.

Unstructured pruning removes single weights instead of whole units. As with
the node masks of `dropnet_jax.models`, the mask is an explicit input: the
forward pass uses `apply_weight_mask(params, wmask)` and the optimiser update
is masked (`masked_updates`), so nothing about the pruning lives inside the
model or the optimiser, and a new mask between cycles recompiles nothing.

Representation
--------------
A weight mask is a nested dict with the nesting of the params tree that holds
*only the prunable leaves*, each a float32 0/1 array of that leaf's shape
(1 kept, 0 pruned). For Model A with the default selection:

    {'Dense_0': {'kernel': (784, 40)}, 'Dense_1': {'kernel': (40, 40)},
     'Dense_2': {'kernel': (40, 10)}}

Non-prunable leaves (biases, batch-norm parameters, ... by default) are
absent rather than None or all-ones, because then

  * the mask alone says what is prunable, so a criterion needs nothing else:
    `criterion(params, wmask, fraction, key) -> wmask`;
  * it is an ordinary pytree of arrays: `jax.tree.map` over masks (stacking
    trials, comparing two masks), jit/vmap arguments and orbax all work as for
    any params-like tree (None leaves would not map against params, and
    all-ones leaves would need a second, static 'prunable' selector).

Functions that combine a mask with a params-shaped tree (`apply_weight_mask`,
`masked_updates`) walk that tree and look each leaf's mask up by path; leaves
without one pass through. A leaf's name is its '/'-joined path,
'Dense_0/kernel'. Masks are built from and applied to the same tree: either the
'params' collection or, for batch-norm models, the whole θ
{'params', 'batch_stats'} (names then start with 'params/'; the running
statistics are never selectable).
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dropnet_jax import theta as theta_lib

WeightMask = dict[str, Any]  # nested dict of float32 0/1 arrays, prunable leaves only

_STATS = theta_lib.BATCH_STATS


def _key_str(k) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def leaf_name(path) -> str:
  """'Dense_0/kernel' for a jax key path."""
  return '/'.join(_key_str(k) for k in path)


def named_leaves(tree) -> dict[str, Any]:
  """{name: leaf} in jax's flattening order (sorted dict keys), so the same order as `jax.tree.leaves`."""
  return {leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def mask_names(wmask: WeightMask) -> tuple[str, ...]:
  """The prunable leaves' names, in the order criteria concatenate them."""
  return tuple(named_leaves(wmask))


def _module_root(tree) -> tuple[str, Mapping]:
  """('params/', tree['params']) for a variables dict, ('', tree) for a params tree."""
  if theta_lib.is_variables(tree):
    return theta_lib.PARAMS + '/', theta_lib.params(tree)
  return '', tree


def output_layer_name(params) -> str | None:
  """The classifier's module: 'classifier' (ResNet18, VGG19) or the top-level `Dense_i` with the largest i.

  Flax numbers auto-named layers in creation order and every model here
  creates its classifier last (Model A: Dense_2 of FC-FC-out, Model B: Dense_0,
  Model C: Dense_1 after FC256). For other trees pass `output_name` explicitly.
  """
  prefix, root = _module_root(params)
  if not isinstance(root, Mapping):
    return None
  if 'classifier' in root:
    return prefix + 'classifier'
  dense = [k for k in root if isinstance(k, str) and k.startswith('Dense_') and k[6:].isdigit()]
  return prefix + max(dense, key=lambda k: int(k[6:])) if dense else None


def prunable_names(params, *, biases: bool = False, batch_norm: bool = False, output_layer: bool = True,
                   output_name: str | None = None) -> tuple[str, ...]:
  """Names of the leaves a weight mask covers.

  Default: every Dense and Conv kernel (leaves named 'kernel'), the output
  layer's included. `biases` adds the biases of those layers, `batch_norm` the
  normalisation layers' 'scale' and 'bias' (a module with a 'scale' and no
  'kernel'), `output_layer=False` drops the classifier module (found by
  `output_layer_name`, or named by `output_name`, e.g. 'Dense_2').
  """
  if not output_layer:
    output_name = output_name or output_layer_name(params)
    if output_name is None:
      raise ValueError('output_layer=False but no output layer found; pass output_name')
  names = []
  for name, leaf in named_leaves(params).items():
    parts = name.split('/')
    if parts[0] == _STATS:
      continue
    module, leaf_key = '/'.join(parts[:-1]), parts[-1]
    if not output_layer and module == output_name:
      continue
    siblings = _subtree(params, parts[:-1])
    if leaf_key == 'kernel':
      names.append(name)
    elif leaf_key == 'bias' and 'kernel' in siblings and biases:
      names.append(name)
    elif leaf_key in ('scale', 'bias') and 'scale' in siblings and 'kernel' not in siblings and batch_norm:
      names.append(name)
  if not names:
    raise ValueError('no prunable leaves selected')
  return tuple(names)


def _subtree(tree, parts):
  for p in parts:
    tree = tree[p]
  return tree


def init_weight_mask(params, names: tuple[str, ...] | None = None, **selection) -> WeightMask:
  """The dense mask (all ones) over `names`, or over `prunable_names(params, **selection)`."""
  if names is None:
    names = prunable_names(params, **selection)
  elif selection:
    raise ValueError('pass either names or selection options, not both')
  leaves = named_leaves(params)
  missing = [n for n in names if n not in leaves]
  if missing:
    raise ValueError(f'no such params leaves: {missing}')
  out: dict = {}
  for name in names:
    *parents, last = name.split('/')
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = jnp.ones(jnp.shape(leaves[name]), jnp.float32)
  return out


def _map_masked(fn: Callable, tree, wmask, *rest):
  """`tree` with fn(leaf, mask, *rest_leaves) at every masked leaf; other leaves unchanged.

  `rest` are trees with the structure of `tree` (e.g. params beside updates).
  Leaf shapes are checked against the mask at trace time.
  """
  if wmask is None:
    return tree
  if isinstance(wmask, Mapping):
    if not isinstance(tree, Mapping):
      raise ValueError(f'weight mask has keys {sorted(wmask)} where the tree has a leaf')
    extra = set(wmask) - set(tree)
    if extra:
      raise ValueError(f'weight mask keys {sorted(extra)} are not in the tree (keys {sorted(tree)})')
    out = {k: _map_masked(fn, v, wmask.get(k), *(r[k] for r in rest)) for k, v in tree.items()}
    return out if type(tree) is dict else type(tree)(out)
  if jnp.shape(tree) != jnp.shape(wmask):
    raise ValueError(f'weight mask shape {jnp.shape(wmask)} != leaf shape {jnp.shape(tree)}')
  return fn(tree, wmask, *rest)


def apply_weight_mask(params, wmask: WeightMask):
  """params with every masked leaf multiplied by its mask (the forward pass's params * mask)."""
  return _map_masked(lambda p, m: p * m.astype(p.dtype), params, wmask)


def select_masked(params, wmask: WeightMask) -> WeightMask:
  """The params leaves that `wmask` covers, in a tree with the mask's structure."""
  leaves = named_leaves(params)
  return jax.tree.unflatten(jax.tree.structure(wmask), [leaves[n] for n in mask_names(wmask)])


def masked_updates(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """`tx` restricted to the kept weights; the mask comes with each update: `update(g, s, params, weight_mask=m)`.

  Before `tx` the gradients of pruned weights are set to 0, so momentum and
  Adam's moments never accumulate anything for them; after `tx` their update
  is replaced by `-params`, so `optax.apply_updates` leaves them exactly 0
  (x + (-x) == 0 in IEEE arithmetic) whatever `tx` did: weight decay,
  momentum, or a θ0 that was not masked to begin with. `params` is required.
  A train step:

      tx = weight_masks.masked_updates(optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(lr, 0.9)))
      grads = jax.grad(lambda p: loss(apply_weight_mask(p, wmask)))(params)
      updates, opt_state = tx.update(grads, opt_state, params, weight_mask=wmask)
      params = optax.apply_updates(params, updates)
  """
  inner = optax.with_extra_args_support(tx)

  def update(updates, state, params=None, *, weight_mask, **extra_args):
    if params is None:
      raise ValueError('masked_updates needs params (to hold pruned weights at exactly 0)')
    updates = _map_masked(lambda u, m: jnp.where(m > 0, u, jnp.zeros_like(u)), updates, weight_mask)
    updates, state = inner.update(updates, state, params, **extra_args)
    updates = _map_masked(lambda u, m, p: jnp.where(m > 0, u, -p.astype(u.dtype)), updates, weight_mask, params)
    return updates, state

  return optax.GradientTransformationExtraArgs(inner.init, update)


# ---- accounting and records (host side: Python ints and floats, JSON-able) ----

def kept_counts(wmask: WeightMask) -> dict[str, int]:
  """{name: number of kept weights} per masked leaf: the compact record of a mask."""
  return {n: int(np.count_nonzero(np.asarray(m))) for n, m in named_leaves(wmask).items()}


def fraction_remaining(wmask: WeightMask) -> float:
  """Kept / total over all masked leaves (1 for the dense mask)."""
  sizes = [int(np.size(m)) for m in jax.tree.leaves(wmask)]
  return sum(kept_counts(wmask).values()) / sum(sizes)


def mask_fingerprint(wmask: WeightMask) -> str:
  """A short hash (16 hex digits of SHA-256) of the names, shapes and bits: equal masks, equal strings.

  Lets records say whether two runs pruned the same weights without storing
  the masks in JSON.
  """
  h = hashlib.sha256()
  for name, m in named_leaves(wmask).items():
    m = np.asarray(m)
    h.update(f'{name}:{m.shape};'.encode())
    h.update(np.packbits(m.reshape(-1) > 0).tobytes())
  return h.hexdigest()[:16]


def encode_weight_mask(wmask: WeightMask) -> dict[str, Any]:
  """JSON-able summary for a results record: kept counts per leaf, the remaining fraction, the fingerprint."""
  return {'kept': kept_counts(wmask), 'fraction_remaining': fraction_remaining(wmask),
          'fingerprint': mask_fingerprint(wmask)}


def sparsity_report(params, wmask: WeightMask) -> dict[str, Any]:
  """Sparsity (the pruned fraction) of the prunable weights, of all params, and per masked leaf.

  Counts are by the mask (a kept weight that happens to be 0 is not pruned).
  'All params' are every leaf of `params` except a 'batch_stats' collection
  (running statistics are not parameters). JSON-able:

      {'prunable_params', 'prunable_kept', 'prunable_sparsity',
       'total_params', 'total_kept', 'global_sparsity',
       'layers': {'Dense_0/kernel': {'size', 'kept', 'sparsity'}, ...}}
  """
  leaves = named_leaves(params)
  total = sum(int(np.size(x)) for n, x in leaves.items() if n.split('/')[0] != _STATS)
  layers = {}
  for name, kept in kept_counts(wmask).items():
    if name not in leaves:
      raise ValueError(f'masked leaf {name} is not in params')
    size = int(np.size(leaves[name]))
    layers[name] = {'size': size, 'kept': kept, 'sparsity': 1 - kept / size}
  size = sum(v['size'] for v in layers.values())
  kept = sum(v['kept'] for v in layers.values())
  pruned = size - kept
  return {'prunable_params': size, 'prunable_kept': kept, 'prunable_sparsity': pruned / size,
          'total_params': total, 'total_kept': total - pruned, 'global_sparsity': pruned / total,
          'layers': layers}
