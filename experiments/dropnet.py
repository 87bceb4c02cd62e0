r"""Runs DropNet (Algorithm 1) and writes results, figures and a summary table.

  python -m experiments.dropnet --model=fc --widths=40,40 --dataset=mnist \
      --data_dir=../shared/data/mnist_subset --metrics=min,max --seeds=1 --out=runs/fc

Writes <out>/config.json, <out>/results.jsonl (one JSON object per seed x
metric x cycle, rewritten atomically after every cycle), <out>/checkpoints/
(orbax; a rerun with the same flags resumes from them) and PNG figures.
"""

import sys
import time

from absl import app

from dropnet_jax.runs import reporting
from experiments import common


def main(argv):
  del argv
  try:
    setup = common.setup_from_flags()
    common.check_out_dir(common.FLAGS.out, setup.settings)
  except ValueError as e:  # includes input_pipeline.DataError
    sys.exit(f'error: {e}')
  start = time.perf_counter()
  records = common.run_dropnet(common.FLAGS.out, setup)
  print(reporting.summary_table(records, 'test_accuracy'))
  print(f'wall time {time.perf_counter() - start:.1f}s (this invocation); results in {common.FLAGS.out}')


def run() -> None:
  """The `dropnet-run` console command (pyproject.toml [project.scripts])."""
  app.run(main)


if __name__ == '__main__':
  run()
