r"""Inference latency of a dense, a masked and a compacted network, next to their MAC ratio.

  python -m experiments.compact_bench --model=fc --widths=40,40 --fraction_remaining=0.2
  python -m experiments.compact_bench --model=conv --widths=64,64 --fraction_remaining=0.25
  python -m experiments.compact_bench --export=exports/min8   # an experiments.compact export

A random mask keeps round(fraction_remaining * width) units of every masked
layer (at least one) of a randomly initialised network; with --export the
network is instead a trained DropNet record exported by `experiments.compact`
(its run's saved θ and mask, and the compact model read back from the export).
Three jitted eval-mode forward passes (logits only) are timed on uint8 images, for each batch size, as the best of --repeats calls
after a warm-up (compilation) call:

  * dense: the model with all-ones masks;
  * masked: the same model with the mask (same arrays, same compute: a mask
    only zeroes activations);
  * compact: dropnet_jax.compaction.compact's smaller dense network with the same logits
    (checked here to 1e-4 of the largest logit).

MACs and params are dropnet_jax.compaction.accounting's analytic counts (per example).
The machine may be shared: the figures are noisy, and tiny networks are
dominated by per-call overhead rather than MACs.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from dropnet_jax import models

from dropnet_jax.compaction import accounting

from dropnet_jax.compaction import compact

from dropnet_jax.runs import saved_params
from dropnet_jax.models.compact import model_name

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Declared when run as a program only, so tests can import this beside other entry points."""
  flags.DEFINE_enum('model', 'fc', sorted(models.MODELS), 'Model: fc (A), conv (B), modelc (C), resnet18, vgg19.')
  flags.DEFINE_list('widths', None, 'Units/filters per masked layer (default: the model\'s).')
  flags.DEFINE_list('image_shape', None, 'H,W,C (default 28,28,1 for fc/conv, else 32,32,3).')
  flags.DEFINE_integer('num_classes', 10, 'Classes.')
  flags.DEFINE_float('fraction_remaining', 0.2, 'Fraction of each masked layer\'s units the random mask keeps.')
  flags.DEFINE_list('batch_sizes', '1,256', 'Batch sizes to time.')
  flags.DEFINE_integer('repeats', 20, 'Timed calls per configuration; the best is reported.')
  flags.DEFINE_integer('seed', 0, 'Seed of the parameters, the mask and the images.')
  flags.DEFINE_string('out', None, 'Optional JSON file for the figures.')
  flags.DEFINE_string('export', None, 'Directory written by experiments.compact: time its record (dense θ, masked, '
                      'and the exported compact model) instead of a random one; --model/--widths/--image_shape/'
                      '--fraction_remaining are then not used.')


def random_masks(widths, fraction: float, rng: np.random.Generator) -> tuple[jax.Array, ...]:
  masks = []
  for w in widths:
    m = np.zeros(w, np.float32)
    m[rng.choice(w, max(1, int(round(fraction * w))), replace=False)] = 1
    masks.append(jnp.asarray(m))
  return tuple(masks)


def best_latency(fn, args, repeats: int) -> float:
  """Seconds of the fastest of `repeats` calls (after one untimed warm-up call)."""
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def time_variants(variants: dict[str, tuple], image_shape, batch_sizes, repeats: int, rng: np.random.Generator,
                  result: dict[str, Any]) -> dict[str, Any]:
  """Times each (model, θ, masks, counts) variant per batch size into result['variants']; checks compact == masked."""
  for batch in batch_sizes:
    images = jnp.asarray(rng.integers(0, 256, (batch, *image_shape)), jnp.uint8)
    logits = {}
    for name, (m, th, mk, counts) in variants.items():
      fn = jax.jit(lambda v, x, masks_, m=m: m.apply(v, x, masks_, train=False)[0])
      args = (compact.variables(th), images, mk)
      logits[name] = np.asarray(fn(*args))
      entry = result['variants'].setdefault(name, {'params': counts.params, 'macs': counts.macs, 'latency_s': {}})
      entry['latency_s'][str(batch)] = best_latency(fn, args, repeats)
    diff = float(np.abs(logits['compact'] - logits['masked']).max())
    if diff > 1e-4 * max(1.0, float(np.abs(logits['masked']).max())):
      raise AssertionError(f'compact and masked logits differ by {diff}')
    result.setdefault('max_abs_logit_diff', {})[str(batch)] = diff
  return result


def run(model_name: str, widths, image_shape, num_classes: int, fraction: float, batch_sizes, repeats: int,
        seed: int) -> dict[str, Any]:
  model = models.create_model(model_name, widths, num_classes)
  theta = models.init_params(model, jax.random.key(seed), image_shape)
  rng = np.random.default_rng(seed)
  masks = random_masks(model.widths, fraction, rng)
  small, small_theta = compact.compact(model, theta, masks, image_shape=image_shape)
  variants = {
      'dense': (model, theta, models.full_masks(model), accounting.count(model, image_shape)),
      'masked': (model, theta, masks, accounting.count(model, image_shape)),  # runs at full size
      'compact': (small, small_theta, models.full_masks(small), accounting.count(small, image_shape)),
  }
  effective = accounting.masked_counts(model, image_shape, masks)
  result: dict[str, Any] = {
      'model': model_name, 'widths': list(model.widths), 'image_shape': list(image_shape),
      'fraction_remaining': fraction, 'units_kept': [int(m.sum()) for m in masks],
      'compact_widths': list(small.widths), 'device': jax.devices()[0].device_kind,
      'effective_params': effective.params, 'effective_macs': effective.macs, 'variants': {}}
  return time_variants(variants, image_shape, batch_sizes, repeats, rng, result)


def run_export(directory: str, batch_sizes, repeats: int, seed: int) -> dict[str, Any]:
  """The same three variants for an `experiments.compact` export: its run's trained θ and mask, and the export.

  dense is the record's trained θ with all-ones masks, masked the record's
  network, compact the model read back from `directory` (not recompacted).
  """
  small, small_theta, spec = compact.load(directory)
  meta, image_shape = spec['meta'], tuple(spec['image_shape'])
  model, theta, masks, record = saved_params.load_network(meta['run'], meta['seed'], meta['metric'], meta['cycle'])
  variants = {
      'dense': (model, theta, models.full_masks(model), accounting.count(model, image_shape)),
      'masked': (model, theta, masks, accounting.count(model, image_shape)),
      'compact': (small, small_theta, models.full_masks(small), accounting.count(small, image_shape)),
  }
  effective = accounting.masked_counts(model, image_shape, masks)
  result: dict[str, Any] = {
      'export': directory, 'run': meta['run'], 'seed': meta['seed'], 'metric': meta['metric'],
      'cycle': meta['cycle'], 'model': model_name(model), 'widths': list(model.widths),
      'image_shape': list(image_shape), 'fraction_remaining': record['fraction_remaining'],
      'units_kept': list(record['units']), 'compact_widths': list(small.widths),
      'device': jax.devices()[0].device_kind, 'effective_params': effective.params,
      'effective_macs': effective.macs, 'variants': {}}
  return time_variants(variants, image_shape, batch_sizes, repeats, np.random.default_rng(seed), result)


def table(result: dict[str, Any]) -> str:
  dense = result['variants']['dense']
  batches = list(dense['latency_s'])
  head = f'{"variant":<8} {"params":>10} {"MACs":>12} {"MAC ratio":>9}'
  for b in batches:
    head += f' {"ms @" + b:>10} {"speedup":>8}'
  rows = [head]
  for name, v in result['variants'].items():
    row = f'{name:<8} {v["params"]:>10,} {v["macs"]:>12,} {v["macs"] / dense["macs"]:>9.3f}'
    for b in batches:
      row += f' {1e3 * v["latency_s"][b]:>10.3f} {dense["latency_s"][b] / v["latency_s"][b]:>8.2f}'
    rows.append(row)
  rows.append(f'(masked MACs are the dense ones: XLA computes every unit; effective MACs of the masked network = '
              f'compact MACs = {result["effective_macs"]:,})')
  return '\n'.join(rows)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  batch_sizes = [int(b) for b in FLAGS.batch_sizes]
  if FLAGS.export:
    result = run_export(FLAGS.export, batch_sizes, FLAGS.repeats, FLAGS.seed)
    print(f'export {FLAGS.export}: seed {result["seed"]} {result["metric"]} cycle {result["cycle"]} of {result["run"]}')
    image_shape = tuple(result['image_shape'])
  else:
    widths = models.parse_widths(FLAGS.widths)
    if FLAGS.image_shape:
      image_shape = tuple(int(v) for v in FLAGS.image_shape)
    else:
      image_shape = (28, 28, 1) if FLAGS.model in ('fc', 'conv') else (32, 32, 3)
    result = run(FLAGS.model, widths, image_shape, FLAGS.num_classes, FLAGS.fraction_remaining, batch_sizes,
                 FLAGS.repeats, FLAGS.seed)
  print(f'{result["model"]} widths={tuple(result["widths"])} image={image_shape} kept={tuple(result["units_kept"])} '
        f'compact widths={tuple(result["compact_widths"])} device={result["device"]}')
  print(table(result))
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  define_flags()
  app.run(main)
