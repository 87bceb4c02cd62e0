r"""What each recipe costs to run at full size, from counted FLOPs (the README's recipe table).

  python -m experiments.recipe_cost                                   # every training recipe in configs/
  python -m experiments.recipe_cost --recipes=configs/vgg19_tiny_imagenet.py,configs/fc40_mnist.py

Per recipe: the network's parameters and MACs per example (full width, `compaction.accounting`), the
training examples of the official dataset, the most epochs the recipe can train (early stopping ends most
cycles sooner: an upper bound), the FLOPs, and the GPU time they take at the stated sustained throughput
with a per-step floor (`dropnet_jax.runs.recipe_cost` gives the model and its assumptions). Recipes that
train nothing (ensembles, compaction, evaluation) are listed as such. Prints a markdown table.
"""

from __future__ import annotations

from dropnet_jax.cli import entry  # first: applies --host_devices before jax is imported

import dataclasses
import glob
import os

from dropnet_jax.cli.config_flags import recipe_config
from dropnet_jax.runs import recipe_cost
from dropnet_jax.settings import setting


@dataclasses.dataclass(frozen=True)
class RecipeCostConfig:
  """Which recipes to cost."""
  recipes: tuple[str, ...] = setting((), 'Recipe files (default: every configs/*.py).', flag='recipes')

  def validate(self) -> None:
    for path in self.recipes:
      if not os.path.isfile(path):
        raise ValueError(f'--recipes: no such file {path}')


CONFIG = entry.define(RecipeCostConfig(), 'recipe_cost', out_required=False, out_help='Not taken: the table is printed.')


def table(paths: list[str]) -> str:
  rows = ['| recipe | params | MACs/example | training examples | epochs (at most) | FLOPs | GPU time (at most) |',
          '| --- | ---: | ---: | ---: | ---: | ---: | ---: |']
  for path in paths:
    config = recipe_config(path)
    try:
      cost = recipe_cost.estimate(config)
    except recipe_cost.TrainsNothing:
      rows.append(f'| `{path}` | | | | 0 | | trains nothing |')
      continue
    rows.append(f'| `{path}` | {cost.params:,} | {cost.macs:,} | {cost.train_examples:,} | {cost.epochs:,} | '
                f'{cost.flops:.2g} | {recipe_cost.format_hours(cost.gpu_seconds)} |')
  return '\n'.join(rows)


def main(argv: list[str]) -> None:
  del argv
  if entry.FLAGS.out:
    entry.fail('--out: recipe_cost prints its table and writes nothing; leave --out out')
  config = entry.config(CONFIG)
  paths = list(config.recipes) or sorted(glob.glob('configs/*.py'))
  try:
    print(table(paths))
  except ValueError as e:
    entry.fail(e)
  print(f'\nAssumed: {recipe_cost.SUSTAINED_FLOPS / 1e12:g} TFLOP/s sustained, at least '
        f'{recipe_cost.MIN_STEP_SECONDS * 1e3:g} ms per training step; every run to its max_epochs.')


def run() -> None:
  """The `dropnet-recipe-cost` console command (pyproject.toml [project.scripts])."""
  entry.run(main)


if __name__ == '__main__':
  run()
