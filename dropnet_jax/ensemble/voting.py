"""Members' class probabilities, and plurality / soft voting of every team.

`predict_proba` evaluates M masked networks of one architecture in a single
compiled pass: parameters and masks carry a leading member axis (the lanes),
the member axis is vmapped and the images are scanned in fixed-size batches,
so memory is M x batch activations whatever N is.

Voting:
  * soft: argmax of the members' mean probability;
  * plurality: the class most members predict (argmax of each member's
    probabilities); a tie between classes goes to the larger mean probability,
    then the lower class index, so the rule is deterministic.
`team_accuracies` scores all teams of one size with `lax.map` over chunks of
teams (vmapped within a chunk), which bounds the memory of the gathered
(teams, s, N, C) probabilities.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dropnet_jax import theta as theta_lib

ApplyFn = Callable[[Any, jax.Array, Any], jax.Array]  # (theta, images, masks) -> logits


def flax_apply_fn(model: Any) -> ApplyFn:
  """(theta, images, masks) -> logits of a dropnet_jax model, train=False.

  theta is the params tree, or {'params', 'batch_stats'} for batch-norm models
  (models.init_params' format; see `dropnet_jax.theta`). Keep the returned
  function and reuse it: `predict_proba` compiles once per function object.
  """
  def apply(theta, images, masks):
    logits, _ = model.apply(theta_lib.variables(theta), images, masks, train=False)
    return logits
  return apply


@functools.partial(jax.jit, static_argnames=('apply_fn', 'batch_size'))
def predict_proba(apply_fn: ApplyFn, thetas_stacked: Any, masks_stacked: Any,
                  images: jax.Array, batch_size: int) -> jax.Array:
  """(M, N, C) softmax probabilities of every member on `images`.

  Args:
    apply_fn: (theta, images, masks) -> logits for one member (static; see `flax_apply_fn`).
    thetas_stacked: parameter pytree with a leading member axis M.
    masks_stacked: mask pytree (tuple of (M, units) 0/1 vectors) with the same leading axis.
    images: (N, ...) images, as the model takes them (uint8 NHWC for dropnet_jax models).
    batch_size: images per scanned step; N is padded up to a multiple and cut back.
  """
  n = images.shape[0]
  steps = -(-n // batch_size)
  pad = steps * batch_size - n
  padded = jnp.concatenate([images, jnp.zeros((pad, *images.shape[1:]), images.dtype)])
  batches = padded.reshape(steps, batch_size, *images.shape[1:])

  def step(carry, batch):
    logits = jax.vmap(lambda theta, masks: apply_fn(theta, batch, masks))(thetas_stacked, masks_stacked)
    return carry, jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  _, probs = jax.lax.scan(step, None, batches)  # (steps, M, B, C)
  members = probs.shape[1]
  return probs.transpose(1, 0, 2, 3).reshape(members, steps * batch_size, -1)[:, :n]


def soft_vote(probs: jax.Array) -> jax.Array:
  """(L, N, C) member probabilities -> (N,) labels of the mean probability."""
  return jnp.argmax(probs.mean(0), axis=-1)


def plurality_vote(probs: jax.Array) -> jax.Array:
  """(L, N, C) -> (N,) most-voted labels; ties go to the larger mean probability, then the lower index."""
  num_classes = probs.shape[-1]
  votes = jax.nn.one_hot(jnp.argmax(probs, -1), num_classes, dtype=jnp.int32).sum(0)  # (N, C)
  tied = votes == votes.max(-1, keepdims=True)
  return jnp.argmax(jnp.where(tied, probs.mean(0), -1.0), axis=-1)


@functools.partial(jax.jit, static_argnames=('chunk',))
def team_accuracies(probs: jax.Array, labels: jax.Array, teams: jax.Array,
                    chunk: int = 128) -> jax.Array:
  """(T, 2) accuracy of each team (T, s) of members of `probs` (M, N, C): [plurality, soft]."""
  def one(team):
    p = probs[team]
    return jnp.stack([(plurality_vote(p) == labels).mean(), (soft_vote(p) == labels).mean()])
  return jax.lax.map(one, teams, batch_size=min(chunk, teams.shape[0]))


def accuracies_by_size(probs: np.ndarray, labels: np.ndarray,
                       teams: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
  """`team_accuracies` for each size's teams, as host arrays."""
  p, y = jnp.asarray(probs), jnp.asarray(labels)
  return tuple(np.asarray(team_accuracies(p, y, jnp.asarray(t))) for t in teams)
