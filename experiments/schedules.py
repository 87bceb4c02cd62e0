r"""Learning-rate schedules compared: one model trained with each schedule for N epochs.

  python -m experiments.schedules --model=fc --widths=40,40 --dataset=mnist \
      --data_dir=../shared/data/mnist_subset --optimizer=momentum --lr=0.05 --max_epochs=50 --out=runs/schedules

Every schedule starts from the same θ0 and sees the same shuffles (--seed), so the schedule is the
only difference. Training runs all --max_epochs epochs (no early stopping unless --early_stop).
The schedules' parameters are the optimiser's flags (--min_lr_factor, --step_epochs, --lr_gamma,
--cyclic_half_epochs, --warmup_epochs, --warmup_start_factor, --schedule_epochs).

Writes <out>/config.json, <out>/schedules.json (settings, per-epoch curves and final accuracies per
schedule; a rerun skips the schedules already there with the same settings, and a directory made with
another model, other data or other training settings is refused before anything is trained),
<out>/schedules.md (the table: train, validation and test accuracy after the last epoch, and at the
best-validation-loss epoch) and <out>/schedules.png (learning rate, training and validation accuracy
per epoch), and each schedule's trained network (its best-validation-loss θ) in <out>/params with a
results.jsonl row (--save_params=none: nothing saved), so that
`python -m experiments.evaluate --networks=<out>:*` tests them again and `--init_from=<out>:seed0/cosine`
starts another run (e.g. experiments.magnitude) from one. The work is `dropnet_jax.runs.schedules`.
"""

from dropnet_jax.cli import entry
from dropnet_jax.runs import schedules

CONFIG = entry.define(schedules.SchedulesConfig(), 'schedules')


def main(argv):
  del argv
  try:
    setup = schedules.prepare(entry.config(CONFIG), entry.FLAGS.out)
  except ValueError as e:  # includes input_pipeline.DataError
    entry.fail(e)
  results = schedules.run(setup, log=lambda line: print(line, flush=True))
  print(schedules.table(results))
  print(f'outputs in {setup.run_dir.path}')


def cli() -> None:
  """The `dropnet-schedules` console command (pyproject.toml [project.scripts])."""
  entry.run(main)


if __name__ == '__main__':
  cli()
