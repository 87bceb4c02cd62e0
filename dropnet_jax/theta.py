"""θ, the trained state of one network: a params tree or a Flax variables dict.

Why two forms: models with batch norm (VGG19) carry running statistics, a
'batch_stats' collection beside 'params', and those statistics are part of θ
(θ0 includes the initial ones, a reset restores them, training updates them).
Every other model carries its params only, and `models.init_params` returns
the bare params tree for it. So θ is either

    params                                   (no batch norm), or
    {'params': params, 'batch_stats': stats} (batch norm; {'params': params}
                                              alone is accepted too).

The two users want different parts: pruning (criteria, weight masks, the
optimiser) works on the trainable params tree, while `model.apply` needs the
variables dict. This module is the one place that tells the forms apart and
converts between them: training, pruning, compaction and the ensembles decode
θ through it only.

    split(θ)                -> (params, batch_stats or None)
    params(θ), batch_stats(θ), has_batch_stats(θ), is_variables(θ)
    variables(θ)            -> the dict for `model.apply` (always a variables dict)
    variables_from(p, s)    -> the same from parts
    join(like, p, s)        -> θ in the form of `like` (trainer and compaction results)
    replace_params(θ, p)    -> θ with new params, the statistics kept
    normalise(θ)            -> θ with plain-dict containers (pytree structures match)

Everything works on concrete arrays and inside jit/vmap (only the dict keys
are inspected). Results are plain dicts, so a FrozenDict θ comes back as a
dict and pytree structures of θs built here always match.
"""

from __future__ import annotations

from typing import Any, Mapping

PARAMS = 'params'
BATCH_STATS = 'batch_stats'
_COLLECTIONS = frozenset((PARAMS, BATCH_STATS))


def is_variables(theta: Any) -> bool:
  """True for a variables dict ({'params'} or {'params', 'batch_stats'}), False for a bare params tree."""
  return isinstance(theta, Mapping) and PARAMS in theta and set(theta) <= _COLLECTIONS


def split(theta: Any) -> tuple[Any, Any]:
  """(params, batch_stats or None)."""
  if is_variables(theta):
    return theta[PARAMS], theta.get(BATCH_STATS)
  return theta, None


def params(theta: Any) -> Any:
  """The trainable params tree (what pruning criteria, weight masks and the optimiser see)."""
  return split(theta)[0]


def batch_stats(theta: Any) -> Any:
  """The batch-norm running statistics, or None for a model without batch norm."""
  return split(theta)[1]


def has_batch_stats(theta: Any) -> bool:
  """True when θ carries batch-norm running statistics."""
  return batch_stats(theta) is not None


def variables_from(params: Any, batch_stats: Any = None) -> dict[str, Any]:
  """{'params': params} plus {'batch_stats': batch_stats} unless it is None: what `model.apply` takes."""
  out = {PARAMS: params}
  if batch_stats is not None:
    out[BATCH_STATS] = batch_stats
  return out


def variables(theta: Any) -> dict[str, Any]:
  """The variables dict to pass to `model.apply`, for θ in either form."""
  return variables_from(*split(theta))


def join(like: Any, params: Any, batch_stats: Any = None) -> Any:
  """θ in the form of `like`: the bare `params` if `like` is a params tree, else a variables dict.

  `batch_stats` replaces like's statistics (None leaves them out, e.g. for a
  compact network without batch norm); see `replace_params` to keep them.
  """
  return variables_from(params, batch_stats) if is_variables(like) else params


def replace_params(theta: Any, new_params: Any) -> Any:
  """θ with its params replaced and its batch statistics (if any) kept, in θ's form."""
  return join(theta, new_params, batch_stats(theta))


def normalise(theta: Any) -> Any:
  """θ with its outer container a plain dict (a params tree is returned as it is)."""
  return join(theta, *split(theta))
