"""dropnet_jax.pth (torch.save files read without torch) and --init_from's twin name mapping, against real
torch.save outputs and the PyTorch twins' logits (torch is the test-only oracle)."""

import collections

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from dropnet_jax import pth  # noqa: E402
from dropnet_jax.compaction import compact  # noqa: E402
from dropnet_jax.models import create_model  # noqa: E402
from dropnet_jax.runs import init_from  # noqa: E402
from tests.torch_reference import models as tmodels  # noqa: E402


def _save(tmp_path, obj, name='sd.pth', **kwargs):
  path = str(tmp_path / name)
  torch.save(obj, path, **kwargs)
  return path


def test_reader_matches_torch_for_dtypes_views_and_batch_norm_buffers(tmp_path):
  base = torch.arange(24, dtype=torch.float64).reshape(4, 6) / 7
  bn = torch.nn.BatchNorm2d(3)
  bn.running_mean.uniform_(-1, 1)
  bn.running_var.uniform_(0.5, 2)
  bn.num_batches_tracked.fill_(17)
  sd = collections.OrderedDict(
      f32=torch.randn(3, 5), f64=base, i64=torch.arange(-5, 5, dtype=torch.int64),
      transposed=base.t(),  # non-contiguous, sharing f64's storage
      sliced=base[1:3, 2:5],  # a view at an offset with strides (6, 1)
      strided=torch.randn(10)[::3], half=torch.randn(4).half(), flags=torch.tensor([True, False, True]),
      scalar=torch.tensor(2.5), empty=torch.zeros(0, 3), **{f'bn.{k}': v for k, v in bn.state_dict().items()})
  loaded = pth.load(_save(tmp_path, sd))
  assert isinstance(loaded, collections.OrderedDict) and list(loaded) == list(sd)
  for k, t in sd.items():
    want = t.numpy()
    assert loaded[k].dtype == want.dtype, k
    assert loaded[k].shape == want.shape, k
    np.testing.assert_array_equal(loaded[k], want, err_msg=k)
  assert loaded['bn.num_batches_tracked'].dtype == np.int64 and int(loaded['bn.num_batches_tracked']) == 17


def test_state_dict_unwrapping_and_refusals(tmp_path):
  lin = torch.nn.Linear(3, 2)
  wrapped = _save(tmp_path, {'net': {f'module.{k}': v for k, v in lin.state_dict().items()}, 'acc': 91.5, 'epoch': 3})
  sd = pth.read_state_dict(wrapped)
  assert sorted(sd) == ['bias', 'weight']
  np.testing.assert_array_equal(sd['weight'], lin.weight.detach().numpy())
  with pytest.raises(pth.PthError, match='refusing to unpickle') as e:
    pth.load(_save(tmp_path, lin, 'module.pth'))  # a whole module, not a state dict
  assert '\n' not in str(e.value)
  with pytest.raises(pth.PthError, match='legacy'):
    pth.load(_save(tmp_path, lin.state_dict(), 'old.pth', _use_new_zipfile_serialization=False))
  with pytest.raises(pth.PthError, match='BFloat16Storage'):
    pth.load(_save(tmp_path, {'w': torch.ones(2, dtype=torch.bfloat16)}, 'bf16.pth'))
  with pytest.raises(pth.PthError, match='not a state dict'):
    pth.read_state_dict(_save(tmp_path, {'acc': 1.0}, 'nothing.pth'))


def _randomise_bn(twin):
  gen = torch.Generator().manual_seed(0)
  for m in twin.modules():
    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
      m.weight.data.uniform_(0.5, 1.5, generator=gen)
      m.bias.data.uniform_(-0.2, 0.2, generator=gen)
      m.running_mean.uniform_(-0.3, 0.3, generator=gen)
      m.running_var.uniform_(0.5, 2.0, generator=gen)
  return twin


TWINS = [('fc', (16, 12), (8, 8, 1)), ('conv', (4, 6), (8, 8, 1)), ('modelc', (4, 4, 6, 6), (8, 8, 3)),
         ('vgg16', (3,) * 13, (8, 8, 3)), ('vgg19', (3,) * 16, (8, 8, 3)),
         ('resnet18_bn', tmodels.resnet18_widths((4, 4, 6, 6)), (8, 8, 3))]


@pytest.mark.parametrize('name,widths,image_shape', TWINS, ids=[t[0] for t in TWINS])
def test_a_twin_state_dict_loads_to_the_same_logits(tmp_path, one_torch_thread, name, widths, image_shape):
  head = (5,) if name == 'modelc' else None
  torch.manual_seed(1)
  twin = _randomise_bn(tmodels.create_model(name, widths, 10, image_shape, head=head)).eval()
  path = _save(tmp_path, twin.state_dict())
  model = create_model(name, widths, 10, head=head)
  theta, info = init_from.load(path, model, image_shape)
  assert info['kind'] == 'torch'
  images = np.random.default_rng(0).integers(0, 256, (5, *image_shape)).astype(np.uint8)
  with torch.no_grad():
    want, _ = twin(torch.from_numpy(images), tmodels.full_masks(twin), with_stats=False)
  got = np.asarray(compact.predict(model, theta, images))
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
  if name in ('vgg16', 'resnet18_bn'):  # the running statistics came across (eval mode uses them)
    stats = jax.tree.leaves(theta['batch_stats'])
    assert stats and not all(np.allclose(s, 0) or np.allclose(s, 1) for s in stats)


def test_a_mismatched_state_dict_is_one_line_naming_layer_and_shapes(tmp_path):
  twin = tmodels.create_model('fc', (16, 12), 10, (8, 8, 1))
  path = _save(tmp_path, twin.state_dict())
  with pytest.raises(ValueError) as e:
    init_from.load(path, create_model('fc', (16, 8), 10), (8, 8, 1))
  message = str(e.value)
  assert '\n' not in message and message.startswith('--init_from:')
  assert 'the fc (widths [16, 8])' in message and 'Dense_1' in message and '(12,)' in message and '(8,)' in message
  with pytest.raises(ValueError, match="no tensor 'convs.0.bias' for conv layer"):
    init_from.load(path, create_model('conv', (4, 6), 10), (8, 8, 1))
  extra = {**twin.state_dict(), 'dense.9.weight': torch.zeros(2, 2)}
  with pytest.raises(ValueError, match='dense.9.weight'):
    init_from.load(_save(tmp_path, extra, 'extra.pth'), create_model('fc', (16, 12), 10), (8, 8, 1))
