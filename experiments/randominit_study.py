r"""Random re-initialisation baseline: each cycle's DropNet mask retrained from a fresh init.

  python -m experiments.randominit_study --dataset=mnist --data_dir=../shared/data/mnist_subset \
      --metrics=min --seeds=3 --out=runs/randominit

Runs DropNet into <out>/theta0 (resumable), then retrains every recorded mask
from a fresh random initialisation (same mask and batch order; only the init
differs) into <out>/randominit.jsonl, and plots both side by side.
"""

import os
import sys

from absl import app, logging

from dropnet_jax.runs import reporting
from dropnet_jax.loop.dropnet import retrain_from_random_init
from dropnet_jax.training.trainer import Trainer
from experiments import common


def main(argv):
  del argv
  try:
    setup = common.setup_from_flags()
    out = common.FLAGS.out
    common.check_out_dir(os.path.join(out, 'theta0'), setup.settings)
  except ValueError as e:
    sys.exit(f'error: {e}')
  theta0 = common.run_dropnet(os.path.join(out, 'theta0'), setup)
  path = os.path.join(out, 'randominit.jsonl')
  reinit = reporting.read_jsonl(path) if os.path.exists(path) else []
  done = {(r['seed'], r['metric'], r['cycle']) for r in reinit}
  trainer = Trainer(setup.model, setup.config.train)
  for record in theta0:
    if (record['seed'], f'{record["metric"]}_randominit', record['cycle']) in done:
      continue  # resumed: already retrained
    reinit.append(retrain_from_random_init(trainer, setup.model, setup.dataset.image_shape, setup.data, record,
                                           setup.config))
    reporting.write_jsonl(path, reinit)
    r = reinit[-1]
    logging.info('randominit seed %d %s cycle %d fraction %.3f test_acc %.4f (θ0: %.4f)', r['seed'], r['metric'],
                 r['cycle'], r['fraction_remaining'], r['test_accuracy'], record['test_accuracy'])
  both = theta0 + reinit
  reporting.save_figures(both, out, title=f'θ0 vs random re-init: {common.default_title(setup)}')
  print(reporting.summary_table(both, 'test_accuracy'))


def run() -> None:
  """The `dropnet-randominit` console command (pyproject.toml [project.scripts])."""
  app.run(main)


if __name__ == '__main__':
  run()
