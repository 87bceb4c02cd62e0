"""DropNet on CIFAR-10, Model C, with every cycle's network saved: the ensemble deck's source. Three global
and three layer-wise metrics, two seeds (so each pool holds networks from two θ0s), the paper's protocol
(SGD lr 0.1, up to 100 epochs a cycle, patience 5, p = 0.2 down to 10 %). The deck's tables then come from
`configs/ensemble_modelc_cifar10.py`.

  python -m experiments.dropnet --config=configs/modelc_cifar10.py --data_dir=<cifar-10-batches-py> \
      --batch_trials --out=runs/modelc_cifar10
"""

from dropnet_jax.config import DataConfig, DropNetConfig, ExperimentConfig, ModelConfig, OutputConfig

SIX_METRICS = ('min', 'max', 'random', 'min_layer', 'max_layer', 'random_layer')


def get_config() -> ExperimentConfig:
  return ExperimentConfig(model=ModelConfig(name='modelc'), data=DataConfig(dataset='cifar10'), seeds=2,
                          dropnet=DropNetConfig(metrics=SIX_METRICS), output=OutputConfig(save_params='all'))
