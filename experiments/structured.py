r"""Structured pruning at initialisation: prune filters of θ0 at per-layer rates or to a parameter budget, train.

  python -m experiments.structured --model=resnet18_bn --dataset=cifar10 --data_dir=DIR \
      --prune_rates=0.1,0.1,0.2,0.2,0.2,0.2,0.3,0.3 --importance=l1,random --out=runs/structured

The "ResNet18 under 5 M" report's rates-before-training network (Torch-Pruning's grouped L1 or random
importance, residual groups pruned together: `dropnet_jax.pruning.structured`), as a one-cycle method of
the one loop (`dropnet_jax.loop.structured`): the dense network, then the pruned one, trained from the
same θ0. `--param_budget=5e6` instead finds the uniform rate. Resumable (rerun the same command). Writes
config.json, results.jsonl/.csv, table.md, the learning curves and params/ (`experiments.compact`
exports the compact network).
"""

from dropnet_jax.cli import entry
from dropnet_jax.runs import structured

CONFIG = entry.define(structured.StructuredRunConfig(), 'structured')


def main(argv):
  del argv
  try:
    setup = structured.prepare(entry.config(CONFIG), entry.FLAGS.out)
  except ValueError as e:
    entry.fail(e)
  _, table = structured.run(setup)
  print(table)


def run():
  """The `dropnet-structured` console command."""
  entry.run(main)


if __name__ == '__main__':
  run()
