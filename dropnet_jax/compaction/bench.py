"""Inference latency of a dense, a masked and a compacted network, next to their MAC ratio.

What `experiments.compact_bench` runs (its docstring has the usage): `prepare(config, out)` checks
the settings, the output directory and the export (if any) before any work; `run(request)` builds
the three networks, times them, and writes `<out>/bench.json`.

A random mask keeps round(fraction_remaining * width) units of every masked layer (at least one) of
a randomly initialised network; with `export` the network is instead a trained DropNet record
exported by `experiments.compact` (its run's saved θ and mask, and the compact model read back from
the export). Three jitted eval-mode forward passes (logits only) are timed on uint8 images, for each
batch size, as the best of `repeats` calls after a warm-up (compilation) call:

  * dense: the model with all-ones masks;
  * masked: the same model with the mask (same arrays, same compute: a mask only zeroes activations);
  * compact: `compact.compact`'s smaller dense network with the same logits (checked here to 1e-4
    of the largest logit).

MACs and params are `accounting`'s analytic counts (per example).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dropnet_jax import theta as theta_lib
from dropnet_jax import models
from dropnet_jax.compaction import accounting, compact
from dropnet_jax.models.compact import model_name
from dropnet_jax.runs import saved_params
from dropnet_jax.runs.run_dir import RunDir
from dropnet_jax.settings import setting

KIND = 'compact_bench'
RESULT_FILE = 'bench.json'


@dataclasses.dataclass(frozen=True)
class CompactBenchConfig:
  """What to time: a random mask of a fresh network, or an `experiments.compact` export."""
  model: str = setting('fc', 'Model: fc (A), conv (B), modelc (C), resnet18, vgg16, vgg19 (a head: widths end with '
                       'it).', flag='model', choices=tuple(sorted(models.MODELS)))
  widths: tuple[int, ...] | None = setting(None, "Units/filters per masked layer (default: the model's).",
                                           flag='widths')
  image_shape: tuple[int, ...] | None = setting(None, 'H,W,C (default 28,28,1 for fc/conv, else 32,32,3).',
                                                flag='image_shape')
  num_classes: int = setting(10, 'Classes.', flag='num_classes')
  fraction_remaining: float = setting(0.2, "Fraction of each masked layer's units the random mask keeps.",
                                      flag='fraction_remaining')
  batch_sizes: tuple[int, ...] = setting((1, 256), 'Batch sizes to time.', flag='batch_sizes')
  repeats: int = setting(20, 'Timed calls per configuration; the best is reported.', flag='repeats')
  seed: int = setting(0, 'Seed of the parameters, the mask and the images.', flag='seed')
  export: str | None = setting(None, 'Directory written by experiments.compact: time its record (dense θ, masked, '
                               'and the exported compact model) instead of a random one; --model/--widths/'
                               '--image_shape/--fraction_remaining are then not used.', flag='export')

  def validate(self) -> None:
    """Raises ValueError naming the offending setting; reads nothing."""
    if not (math.isfinite(self.fraction_remaining) and 0 < self.fraction_remaining <= 1):
      raise ValueError(f'fraction_remaining must be in (0, 1], got {self.fraction_remaining}')
    if self.widths is not None and (not self.widths or any(w < 1 for w in self.widths)):
      raise ValueError(f'widths must be positive integers, got {self.widths}')
    if self.image_shape is not None and (len(self.image_shape) != 3 or any(v < 1 for v in self.image_shape)):
      raise ValueError(f'image_shape must be three positive integers H,W,C, got {self.image_shape}')
    if self.num_classes < 1:
      raise ValueError(f'num_classes must be >= 1, got {self.num_classes}')
    if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
      raise ValueError(f'batch_sizes must be positive integers, got {self.batch_sizes}')
    if len(set(self.batch_sizes)) != len(self.batch_sizes):
      raise ValueError(f'batch_sizes: duplicates in {self.batch_sizes}')
    if self.repeats < 1:
      raise ValueError(f'repeats must be >= 1, got {self.repeats}')
    if self.seed < 0:
      raise ValueError(f'seed must be >= 0, got {self.seed}')

  def resolved_image_shape(self) -> tuple[int, ...]:
    if self.image_shape:
      return tuple(self.image_shape)
    return (28, 28, 1) if self.model in ('fc', 'conv') else (32, 32, 3)


@dataclasses.dataclass
class Request:
  """A checked benchmark: its settings and output directory (nothing built or written yet)."""
  config: CompactBenchConfig
  run_dir: RunDir


def check_export(directory: str) -> dict[str, Any]:
  """The spec.json of an `experiments.compact` export whose run still holds the record's θ; ValueError else."""
  spec_path = os.path.join(directory, compact.SPEC_FILE)
  if not os.path.isfile(spec_path):
    raise ValueError(f'--export={directory}: no {compact.SPEC_FILE}; not a complete experiments.compact export')
  try:
    with open(spec_path) as f:
      spec = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'--export={directory}: {spec_path} is not readable JSON ({e})') from None
  meta = spec.get('meta', {})
  if spec.get('format') != compact.FORMAT or not {'run', 'seed', 'metric', 'cycle'} <= set(meta):
    raise ValueError(f'--export={directory}: not an experiments.compact export (its spec.json names no record)')
  params = saved_params._path(os.path.join(meta['run'], 'params'), meta['seed'], meta['metric'], meta['cycle'])
  if not os.path.isdir(params):
    raise ValueError(f'--export={directory}: the params of its record are gone ({params} does not exist)')
  return spec


def prepare(config: CompactBenchConfig, out: str) -> Request:
  """Every check before any work (settings, --out, the export or the model); writes nothing."""
  config.validate()
  run_dir = RunDir(out, KIND, config, inputs=[config.export] if config.export else [])
  run_dir.check()
  if config.export:
    check_export(config.export)
  else:
    models.create_model(config.model, config.widths, config.num_classes)  # refuses bad widths (builds nothing)
  return Request(config, run_dir)


def run(request: Request) -> dict[str, Any]:
  """Times the three variants into the request's directory (<out>/bench.json); returns the figures."""
  c = request.config
  with request.run_dir.open():
    if c.export:
      result = run_export(c.export, c.batch_sizes, c.repeats, c.seed)
    else:
      result = run_random(c.model, c.widths, c.resolved_image_shape(), c.num_classes, c.fraction_remaining,
                          c.batch_sizes, c.repeats, c.seed)
    request.run_dir.write_text(RESULT_FILE, json.dumps(result, indent=1))
  return result


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
      args = (theta_lib.variables(th), images, mk)
      logits[name] = np.asarray(fn(*args))
      entry = result['variants'].setdefault(name, {'params': counts.params, 'macs': counts.macs, 'latency_s': {}})
      entry['latency_s'][str(batch)] = best_latency(fn, args, repeats)
    diff = float(np.abs(logits['compact'] - logits['masked']).max())
    if diff > 1e-4 * max(1.0, float(np.abs(logits['masked']).max())):
      raise AssertionError(f'compact and masked logits differ by {diff}')
    result.setdefault('max_abs_logit_diff', {})[str(batch)] = diff
  return result


def _variants(model, theta, masks, small, small_theta, image_shape) -> dict[str, tuple]:
  return {
      'dense': (model, theta, models.full_masks(model), accounting.count(model, image_shape)),
      'masked': (model, theta, masks, accounting.count(model, image_shape)),  # runs at full size
      'compact': (small, small_theta, models.full_masks(small), accounting.count(small, image_shape)),
  }


def run_random(name: str, widths, image_shape, num_classes: int, fraction: float, batch_sizes, repeats: int,
               seed: int) -> dict[str, Any]:
  """The three variants of a randomly initialised `name` network under a random mask."""
  model = models.create_model(name, widths, num_classes)
  theta = models.init_params(model, jax.random.key(seed), image_shape)
  rng = np.random.default_rng(seed)
  masks = random_masks(model.widths, fraction, rng)
  small, small_theta = compact.compact(model, theta, masks, image_shape=image_shape)
  effective = accounting.masked_counts(model, image_shape, masks)
  result: dict[str, Any] = {
      'model': name, 'widths': list(model.widths), 'image_shape': list(image_shape),
      'fraction_remaining': fraction, 'units_kept': [int(m.sum()) for m in masks],
      'compact_widths': list(small.widths), 'device': jax.devices()[0].device_kind,
      'effective_params': effective.params, 'effective_macs': effective.macs, 'variants': {}}
  return time_variants(_variants(model, theta, masks, small, small_theta, image_shape), image_shape, batch_sizes,
                       repeats, rng, result)


def run_export(directory: str, batch_sizes, repeats: int, seed: int) -> dict[str, Any]:
  """The same three variants for an `experiments.compact` export: its run's trained θ and mask, and the export.

  dense is the record's trained θ with all-ones masks, masked the record's
  network, compact the model read back from `directory` (not recompacted).
  """
  small, small_theta, spec = compact.load(directory)
  meta, image_shape = spec['meta'], tuple(spec['image_shape'])
  model, theta, masks, record = saved_params.load_network(meta['run'], meta['seed'], meta['metric'], meta['cycle'])
  effective = accounting.masked_counts(model, image_shape, masks)
  result: dict[str, Any] = {
      'export': directory, 'run': meta['run'], 'seed': meta['seed'], 'metric': meta['metric'],
      'cycle': meta['cycle'], 'model': model_name(model), 'widths': list(model.widths),
      'image_shape': list(image_shape), 'fraction_remaining': record['fraction_remaining'],
      'units_kept': list(record['units']), 'compact_widths': list(small.widths),
      'device': jax.devices()[0].device_kind, 'effective_params': effective.params,
      'effective_macs': effective.macs, 'variants': {}}
  return time_variants(_variants(model, theta, masks, small, small_theta, image_shape), image_shape, batch_sizes,
                       repeats, np.random.default_rng(seed), result)


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
