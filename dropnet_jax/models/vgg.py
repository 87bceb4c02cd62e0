"""VGG16 and VGG19 with batch norm and a configurable classifier head, masked.

They follow the contract of `dropnet_jax.models`: `__call__(images, masks,
train=False) -> (logits, stats)`, uint8 images scaled by `to_float`, one mask
vector (and one `UnitStats`) per masked layer, `widths` with one entry per
masked layer (so `models.full_masks` works).

Convolutional part
------------------
3x3 convs (pad 1, no bias: batch norm follows), each conv -> BatchNorm -> ReLU
-> mask, and a 2x2 max-pool (stride 2) after each of the 5 stages:

  VGG16: 2-2-3-3-3 convs (13), VGG19: 2-2-4-4-4 convs (16), with 64-128-256-512-512 filters.

Pools use 'SAME' padding, so a 1x1 map stays 1x1 and small test inputs work;
on even sizes (32 and 64 halve down to 1 and 2) it is 'VALID' exactly.
Batch norm is `layers.BatchNorm(use_running_average=not train, momentum=0.9,
epsilon=1e-5)` (PyTorch's defaults and its unbiased running variance; torch's
momentum 0.1 is Flax's 0.9), so init creates a 'batch_stats' collection; train with `mutable=['batch_stats']`.
The mask follows the ReLU, so a dropped filter outputs exactly 0 whatever its
BN scale/bias.

Classifier head
---------------
Global average pooling over the last map, then the hidden FC layers `head`
(each Dense -> ReLU -> mask -> dropout), then Dense(num_classes). The hidden
FC units are masked layers (nodes), as in Model A: `widths` lists every masked
layer, the convs first and then the head, so it has 13 (16) + len(head) entries
and `widths[n_convs:] == head` (checked: `head` says which of the widths are FC
nodes, and a compacted VGG carries its kept head widths in both).

Default head: () -- GAP, then the classifier, the model as it was before heads
existed (so existing runs, records and tests are unchanged). The source
documents' heads are recipes, not defaults:

  * the DropNet reproduction report's VGG19 on Tiny ImageNet: `--head=1024`
    (FC1024 -> FC200); on MNIST (padded to 32x32x3): `--head=256` (FC256 -> FC10);
  * the ensemble deck's VGG16 on CIFAR-10: no hidden FC (`--head` left out).

`create_model` scales the default conv widths by `--width_multiplier` and
takes the head widths as given (as it takes Model C's head and explicit
`--widths`: an explicit number is not rescaled).

GAP vs flatten. For 32x32 inputs the last map is 1x1, so GAP equals flatten ->
Linear(512, ...) (the usual CIFAR VGG). For 64x64 inputs (Tiny ImageNet) the
last map is 2x2x512: a torchvision-style flatten would feed 2048 features to
the first FC layer, GAP feeds 512 (their mean over the 4 positions). With
`--head=1024` the first FC then has 512*1024 + 1024 = 525,312 parameters
instead of 2048*1024 + 1024 = 2,098,176 (VGG19 in total 20,760,200 instead
of 22,333,064 for 200 classes). We keep GAP: one classifier for every input
size, and a report whose "VGG19" flattens a 2x2 map differs from ours in the
first FC layer only.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import flax.linen as nn
import jax

from dropnet_jax.models.layers import KERNEL_INIT, BatchNorm, InputNorm, Masks, dropout, masked_relu, to_float

VGG16_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
VGG16_POOL_AFTER = (1, 3, 6, 9, 12)  # conv indices followed by a max-pool
VGG19_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512)
VGG19_POOL_AFTER = (1, 3, 7, 11, 15)


class VGG(nn.Module):
  """conv -> BN -> ReLU -> mask stages with max-pools, GAP, head FCs (Dense -> ReLU -> mask -> dropout), Dense.

  Subclasses set the conv plan (`CONV_WIDTHS`, `POOL_AFTER`); see the module docstring.
  """
  CONV_WIDTHS: ClassVar[tuple[int, ...]] = ()
  POOL_AFTER: ClassVar[tuple[int, ...]] = ()

  widths: Sequence[int] = ()  # the convs' widths, then the head's (one per masked layer)
  head: Sequence[int] = ()  # hidden FC widths: widths[len(CONV_WIDTHS):]
  num_classes: int = 10
  dropout: float = 0.0  # after each head layer (its mask applied) and on the features the classifier reads
  input_norm: InputNorm = None
  initializer: str = 'glorot'  # glorot or torch: what `init_params` draws θ0 from

  @classmethod
  def num_convs(cls) -> int:
    return len(cls.CONV_WIDTHS)

  @nn.compact
  def __call__(self, images: jax.Array, masks: Masks, train: bool = False):
    n = self.num_convs()
    check_widths(type(self).__name__, n, self.widths, self.head)
    if len(masks) != len(self.widths):
      raise ValueError(f'{len(masks)} masks for {len(self.widths)} masked layers')
    x = to_float(images, self.input_norm)
    stats = []
    for i, (width, mask) in enumerate(zip(self.widths[:n], masks[:n])):
      x = nn.Conv(int(width), (3, 3), padding=((1, 1), (1, 1)), use_bias=False, kernel_init=KERNEL_INIT,
                  name=f'conv{i}')(x)
      x = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f'bn{i}')(x)
      x, s = masked_relu(x, mask)
      stats.append(s)
      if i in self.POOL_AFTER:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')
    x = x.mean(axis=(1, 2))
    for j, (width, mask) in enumerate(zip(self.widths[n:], masks[n:])):
      x, s = masked_relu(nn.Dense(int(width), kernel_init=KERNEL_INIT, name=f'fc{j}')(x), mask)
      x = dropout(x, self.dropout, train)
      stats.append(s)
    if not self.head:  # with a head, the last FC layer's dropout is the classifier's input dropout
      x = dropout(x, self.dropout, train)
    logits = nn.Dense(self.num_classes, kernel_init=KERNEL_INIT, name='classifier')(x)
    return logits, tuple(stats)


class VGG16(VGG):
  """VGG16 with batch norm (13 convs, 2-2-3-3-3); see the module docstring."""
  CONV_WIDTHS: ClassVar[tuple[int, ...]] = VGG16_WIDTHS
  POOL_AFTER: ClassVar[tuple[int, ...]] = VGG16_POOL_AFTER
  widths: Sequence[int] = VGG16_WIDTHS


class VGG19(VGG):
  """VGG19 with batch norm (16 convs, 2-2-4-4-4); see the module docstring."""
  CONV_WIDTHS: ClassVar[tuple[int, ...]] = VGG19_WIDTHS
  POOL_AFTER: ClassVar[tuple[int, ...]] = VGG19_POOL_AFTER
  widths: Sequence[int] = VGG19_WIDTHS


VGG_MODELS = {'vgg16': VGG16, 'vgg19': VGG19}


def _positive_ints(values) -> bool:
  return all(int(v) == v and v > 0 for v in values)


def check_widths(title: str, num_convs: int, widths: Sequence[int], head: Sequence[int]) -> None:
  """Raises ValueError unless `widths` are `num_convs` conv widths followed by the `head` widths, all positive."""
  widths, head = tuple(widths), tuple(head)
  if len(widths) != num_convs + len(head) or not _positive_ints(widths):
    raise ValueError(f'{title} needs {num_convs} positive conv widths + {len(head)} head widths, got {widths}')
  if widths[num_convs:] != head:
    raise ValueError(f'{title}: the widths after the {num_convs} convs {widths[num_convs:]} differ from head {head}')


def widths_with_head(name: str, widths: Sequence[int], head: Sequence[int] | None) -> tuple[tuple[int, ...],
                                                                                            tuple[int, ...]]:
  """(widths, head) of a `name` VGG from `--widths` and `--head`.

  `widths` may be the conv widths alone (the head, default (), is appended) or
  conv + head widths (the head is their tail; a `head` given too must equal it).
  """
  cls = VGG_MODELS[name]
  n, widths = cls.num_convs(), tuple(int(w) for w in widths)
  if head is not None and not _positive_ints(head):
    raise ValueError(f'head widths must be positive integers, got {tuple(head)}')
  if len(widths) < n:
    raise ValueError(f'{cls.__name__} needs {n} conv widths (then optionally the head widths), got {widths}')
  tail = widths[n:]
  if head is None:
    head = tail
  head = tuple(int(w) for w in head)
  if tail and tail != head:
    raise ValueError(f'{cls.__name__}: widths end with head widths {tail} but head is {head}')
  return widths[:n] + head, head


def layer_names(model: VGG) -> tuple[str, ...]:
  """A name per masked layer, in mask order: conv0.. then fc0.. (the head)."""
  n = model.num_convs()
  return tuple(f'conv{i}' for i in range(n)) + tuple(f'fc{j}' for j in range(len(model.widths) - n))


def incoming_params(model: VGG) -> tuple[tuple[tuple[str, ...], ...], ...]:
  """Per masked layer, the param paths whose last-axis entry u feeds unit u: (convI,), (bnI,) (the
  'batch_stats' collection has the same bnI paths), and (fcJ,) for the head."""
  n = model.num_convs()
  return (tuple(((f'conv{i}',), (f'bn{i}',)) for i in range(n))
          + tuple(((f'fc{j}',),) for j in range(len(model.widths) - n)))
