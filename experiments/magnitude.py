r"""Unstructured magnitude pruning: one-shot, iterative fine-tuning and lottery tickets, side by side.

  python -m experiments.magnitude --model=fc --widths=300,100 --dataset=mnist \
      --data_dir=../shared/data/mnist_subset --methods=oneshot,iterative,lottery,lottery_reinit \
      --sparsities=0.5,0.75,0.9 --seeds=3 --out=runs/magnitude

Every method runs in the one DropNet loop at weight granularity
(`dropnet_jax.loop.magnitude`), all methods x targets x seeds trained together
in one compiled program, resumable (rerun the same command). Writes config.json,
results.jsonl/.csv (one record per trial and cycle: sparsity of the prunable
weights and of all params, per-layer sparsity, accuracies), table.md (method
x target sparsity -> test-accuracy drop against the dense network),
test_accuracy_vs_weights.png (test accuracy vs fraction of weights remaining,
one line per method; with --dropnet_run, DropNet's node pruning placed by the
weights of its compact networks) and params/ (--save_params; default: each
trial's last cycle, pruned weights exactly 0).
"""

from dropnet_jax.cli import entry
from dropnet_jax.runs import magnitude

CONFIG = entry.define(magnitude.MagnitudeRunConfig(), 'magnitude')


def main(argv):
  del argv
  try:
    setup = magnitude.prepare(entry.config(CONFIG), entry.FLAGS.out)
  except ValueError as e:
    entry.fail(e)
  _, table = magnitude.run(setup)
  print(table)


def run():
  """The `dropnet-magnitude` console command."""
  entry.run(main)


if __name__ == '__main__':
  run()
