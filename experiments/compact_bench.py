r"""Inference latency of a dense, a masked and a compacted network, next to their MAC ratio.

  python -m experiments.compact_bench --model=fc --widths=40,40 --fraction_remaining=0.2 --out=runs/bench_fc
  python -m experiments.compact_bench --model=conv --widths=64,64 --fraction_remaining=0.25 --out=runs/bench_conv
  python -m experiments.compact_bench --export=exports/min8 --out=runs/min8_bench   # an experiments.compact export

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
The figures go to <out>/bench.json (beside config.json; `dropnet_jax.compaction.bench`).
The machine may be shared: the figures are noisy, and tiny networks are
dominated by per-call overhead rather than MACs.
"""

from dropnet_jax.cli import entry
from dropnet_jax.compaction import bench

CONFIG = entry.define(bench.CompactBenchConfig(), bench.KIND,
                      out_help=f'Output directory: config.json and {bench.RESULT_FILE} (the figures).')


def main(argv):
  del argv  # stray words are refused by entry.run before main
  try:
    request = bench.prepare(entry.config(CONFIG), entry.FLAGS.out)
  except ValueError as e:
    entry.fail(e)
  result = bench.run(request)
  if 'export' in result:
    print(f'export {result["export"]}: seed {result["seed"]} {result["metric"]} cycle {result["cycle"]} of '
          f'{result["run"]}')
  print(f'{result["model"]} widths={tuple(result["widths"])} image={tuple(result["image_shape"])} '
        f'kept={tuple(result["units_kept"])} compact widths={tuple(result["compact_widths"])} '
        f'device={result["device"]}')
  print(bench.table(result))
  print(f'figures in {request.run_dir.file(bench.RESULT_FILE)}')


def run() -> None:
  entry.run(main)


if __name__ == '__main__':
  run()
