"""Gradients of convolutions and max pools that XLA:CPU runs fast inside loops.

`with_fast_grads(fun)` re-evaluates `fun`'s jaxpr with the NHWC convolutions
(any stride, no dilation) and the non-overlapping max pools swapped for custom-VJP versions
whose backward passes are plain forward-style convolutions and elementwise
code. Inside a `lax.scan` (a training epoch) XLA:CPU runs autodiff's own
gradient convolutions (transposed dimension labels) and its select-and-scatter
tens of times slower. The values are the same up to float rounding. This
module knows nothing of pruning or training; `train.Trainer` applies it on CPU.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.extend
import jax.numpy as jnp


_NHWC_HWIO = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # lhs, rhs, out specs of Flax's 2-D convs


def _conv_handled(eqn) -> bool:
  """Whether a conv_general_dilated equation is one `_conv_fast_grads` handles."""
  p = eqn.params
  dn = p['dimension_numbers']
  lhs, rhs = (v.aval for v in eqn.invars)
  if (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) != _NHWC_HWIO or lhs.ndim != 4:
    return False
  if lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32 or p['preferred_element_type'] not in (None, jnp.float32):
    return False
  if p['feature_group_count'] != 1 or p['batch_group_count'] != 1:
    return False
  if any(v != 1 for v in (*p['lhs_dilation'], *p['rhs_dilation'])) or any(v < 1 for v in p['window_strides']):
    return False
  return all(0 <= lo < k and 0 <= hi < k for (lo, hi), k in zip(p['padding'], rhs.shape[:2]))


def _conv_fast_grads(params):
  """The convolution of `params` (NHWC/HWIO, any stride, no dilation) with gradients written as plain
  stride-1 forward convolutions on explicitly transposed operands.

  Autodiff's own gradient convolutions have transposed dimension labels
  (f01b_i01o->01bf for the kernel, b01f_01oi->b01f for the input) and, for a
  strided convolution, lhs/rhs dilations; inside a while loop (the epoch's
  scan) XLA:CPU runs those tens of times slower than forward-style
  b01f_01io->b01f convolutions, which it runs outside loops. A stride s is
  handled by dilating the output gradient explicitly (s-1 zeros between its
  entries, `lax.pad`'s interior padding) so both gradients stay stride-1
  convolutions: the kernel gradient then costs about s² times its strided
  FLOPs, still far less than the slow path. The values are the same up to
  float rounding.
  """
  padding = tuple(tuple(p) for p in params['padding'])
  strides = tuple(params['window_strides'])
  precision = params['precision']
  dn = ('NHWC', 'HWIO', 'NHWC')

  @jax.custom_vjp
  def conv(x, w):
    return jax.lax.conv_general_dilated_p.bind(x, w, **params)

  def fwd(x, w):
    return conv(x, w), (x, w)

  def bwd(res, g):
    x, w = res
    kernel = w.shape[:2]
    if any(s > 1 for s in strides):  # the gradient at every input offset the windows start from
      g = jax.lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), *((0, 0, s - 1) for s in strides), (0, 0, 0)))
    # Rows of the padded input that no window reaches (stride > 1, size not a multiple): gradient 0.
    spare = [x.shape[1 + a] + lo + hi - (g.shape[1 + a] + kernel[a] - 1) for a, (lo, hi) in enumerate(padding)]
    # d/dx: the output gradient convolved with the flipped kernel, its in/out features swapped; then
    # the padding removed.
    w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    pad_t = tuple((k - 1 - lo, k - 1 - hi + extra) for (lo, hi), k, extra in zip(padding, kernel, spare))
    dx = jax.lax.conv_general_dilated(g, w_t, (1, 1), pad_t, dimension_numbers=dn, precision=precision)
    # d/dw: features of x as the batch, examples as the contracted input features.
    x_pad = padding if not any(spare) else tuple((lo, hi - extra) for (lo, hi), extra in zip(padding, spare))
    dw = jax.lax.conv_general_dilated(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1), x_pad,
                                      dimension_numbers=dn, precision=precision)
    return dx, dw.transpose(1, 2, 0, 3)

  conv.defvjp(fwd, bwd)
  return conv


def _pool_handled(eqn) -> bool:
  """Whether a reduce_window_max equation is a non-overlapping NHWC max pool (`_max_pool_fast_grads`)."""
  p = eqn.params
  x = eqn.invars[0].aval
  win = tuple(p['window_dimensions'])
  return (x.ndim == 4 and jnp.issubdtype(x.dtype, jnp.floating) and win[0] == win[3] == 1
          and tuple(p['window_strides']) == win and all(lo == hi == 0 for lo, hi in p['padding'])
          and all(d == 1 for d in (*p['base_dilation'], *p['window_dilation']))
          and x.shape[1] % win[1] == 0 and x.shape[2] % win[2] == 0)


def _max_pool_fast_grads(params):
  """Non-overlapping max pooling as a max over reshaped windows; the gradient goes to the first
  maximum of each window in row-major order, as autodiff's select-and-scatter does, but with
  elementwise code instead of XLA:CPU's slow variadic reduce-window and scatter."""
  _, kh, kw, _ = params['window_dimensions']

  def windows(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // kh, kh, w // kw, kw, c)

  @jax.custom_vjp
  def pool(x):
    return windows(x).max(axis=(2, 4))

  def fwd(x):
    y = pool(x)
    return y, (x, y)

  def bwd(res, g):
    x, y = res
    xw = windows(x)
    is_max = xw == y[:, :, None, :, None, :]
    taken = jnp.zeros_like(y, dtype=bool)
    rows = []
    for i in range(kh):
      cols = []
      for j in range(kw):
        first = is_max[:, :, i, :, j, :] & ~taken
        taken = taken | first
        cols.append(jnp.where(first, g, jnp.zeros_like(g)))
      rows.append(jnp.stack(cols, axis=3))  # (b, h', w', kw, c)
    dx = jnp.stack(rows, axis=2)  # (b, h', kh, w', kw, c)
    return (dx.reshape(x.shape),)

  pool.defvjp(fwd, bwd)
  return pool


_REWRITES = {'conv_general_dilated': (_conv_handled, _conv_fast_grads),
             'reduce_window_max': (_pool_handled, _max_pool_fast_grads)}
_CALLS = ('pjit', 'jit', 'closed_call')


def _has_rewrite(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in _REWRITES and _REWRITES[name][0](eqn):
      return True
    if name in _CALLS and 'jaxpr' in eqn.params and _has_rewrite(eqn.params['jaxpr'].jaxpr):
      return True
  return False


def _eval_with_fast_grads(jaxpr, consts, *args):
  """Evaluates a jaxpr (like jax.core.eval_jaxpr), swapping in the `_REWRITES` for the equations
  they handle, including those inside nested jit calls (which are inlined)."""
  env = {}
  read = lambda v: v.val if isinstance(v, jax.extend.core.Literal) else env[v]
  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name in _REWRITES and _REWRITES[name][0](eqn):
      outvals = [_REWRITES[name][1](eqn.params)(*invals)]
    elif name in _CALLS and 'jaxpr' in eqn.params:
      sub = eqn.params['jaxpr']
      outvals = _eval_with_fast_grads(sub.jaxpr, sub.consts, *invals)
    else:
      with eqn.ctx.manager:
        outvals = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      if not eqn.primitive.multiple_results:
        outvals = [outvals]
    for v, x in zip(eqn.outvars, outvals):
      env[v] = x
  return [read(v) for v in jaxpr.outvars]


def with_fast_grads(fun: Callable) -> Callable:
  """`fun` (positional array arguments) with the gradients of its stride-1 NHWC convolutions and
  non-overlapping max pools computed by code XLA:CPU runs fast inside loops (see
  `_conv_fast_grads`, `_max_pool_fast_grads`); the same values up to float rounding. `fun`
  itself when it has neither, so e.g. MLPs compile exactly as before."""
  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*args)
    if not _has_rewrite(closed.jaxpr):
      return fun(*args)
    out = _eval_with_fast_grads(closed.jaxpr, closed.consts, *jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), out)
  return wrapped
