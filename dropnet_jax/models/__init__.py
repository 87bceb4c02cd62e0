"""The masked networks: the DropNet paper's Models A, B, C (`small`), ResNet18 (`large`), VGG16/VGG19 (`vgg`),
the CIFAR ResNet18 with batch norm of the PyTorch reports (`resnet_bn`), their building blocks
(`layers`: masks, unit statistics, initialisers) and the genuinely smaller networks compaction builds
(`compact`).

`create_model(name, widths, num_classes, width_multiplier)` is the one constructor every entry point
uses; `init_params` gives θ0 for a model and image shape.
"""

from dropnet_jax.models.layers import full_masks, masked_relu, to_float
from dropnet_jax.models.small import (INITIALIZERS, MODELS, ConvNet, MLP, ModelC, create_model, init_params,
                                      model_from_config, parse_widths)

__all__ = ['INITIALIZERS', 'MODELS', 'ConvNet', 'MLP', 'ModelC', 'create_model', 'full_masks', 'init_params',
           'masked_relu', 'model_from_config', 'parse_widths', 'to_float']
