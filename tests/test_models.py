"""Tests of the U-Net, the heads and the PixSSL model (shapes, dtypes, presets, errors)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pixssl_jax import config_files
from pixssl_jax import config_loading
from pixssl_jax.models import layers
from pixssl_jax.models import segmentation
from pixssl_jax.models.pixssl import build_model, init_params, PixSSLModel
from pixssl_jax.models.unet import UNet
from pixssl_jax.rundir import config_upgrade

TINY = dict(features=(8, 16, 32), num_groups=4, proj_hidden=32, proj_dim=16, pixel_level=2,
            pixel_hypercolumn=False, pixel_proj_dim=16, stabilizer_hidden=32,
            stabilizer_dropout=0.1, head_norm='batch', pixel_norm='group', layers='auto')
# An 'rbg' key: jit-compiling Flax init with threefry keys takes ~8 s for a tiny 3-D U-Net on
# this CPU against ~1 s with rbg; the values do not matter to these tests.
INIT_KEY = jax.random.key(0, impl='rbg')
def _cfg(fields, dtype='float32'):
  return ml_collections.ConfigDict(dict({'pixel_norm': 'group', 'layers': 'auto'}, **fields,
                                        dtype=dtype))


@pytest.mark.parametrize('ndim,shape,features', [
    (2, (2, 16, 16, 1), (8, 16, 32)),
    (3, (1, 8, 8, 8, 1), (8, 16)),
])
def test_unet_shapes(ndim, shape, features):
  net = UNet(ndim, features, num_groups=4)
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)

  @jax.jit  # one compile instead of hundreds of eager per-op compiles
  def init_and_apply(x):
    params = net.init(INIT_KEY, x)
    return params, net.apply(params, x)

  params, (bottleneck, decoder) = init_and_apply(x)
  factor = net.downsampling_factor
  assert factor == 2 ** (len(features) - 1)
  spatial = shape[1:-1]
  assert bottleneck.shape == (shape[0], *[s // factor for s in spatial], features[-1])
  assert len(decoder) == len(features)
  for level, feats in enumerate(decoder):
    assert feats.shape == (shape[0], *[s // 2 ** level for s in spatial], features[level])
  assert np.all(np.isfinite(np.asarray(decoder[0])))
  # GroupNorm, never BatchNorm: no state collection besides the params.
  assert set(params) == {'params'}


def test_unet_rejects_indivisible_patch():
  net = UNet(2, (8, 16, 32), num_groups=4)
  with pytest.raises(ValueError, match='divisible by the down-sampling factor 4'):
    net.init(INIT_KEY, jnp.zeros((1, 18, 16, 1)))


@pytest.fixture(scope='module')
def tiny():
  """The tiny model, its params and one jitted apply (student and teacher outputs)."""
  model = build_model(_cfg(TINY), ndim=2)
  params = jax.jit(lambda k: init_params(model, k, (1, 16, 16, 1)))(INIT_KEY)

  @jax.jit
  def apply(params, x):
    return (model.apply({'params': params}, x),
            model.apply({'params': params}, x, with_predictor=False))

  return model, params, apply


def test_model_outputs_and_all_params_initialised(tiny):
  model, params, apply = tiny
  assert set(params) == {'backbone', 'projector', 'predictor', 'pixel_projector', 'stabilizer'}
  leaves = jax.tree_util.tree_leaves(params)
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 16, 16, 1)), jnp.float32)
  out, teacher = apply(params, x)
  assert out['global_proj'].shape == (3, 16) and out['global_pred'].shape == (3, 16)
  assert out['pixel_proj'].shape == (3, 4, 4, 16)
  assert model.pixel_stride == 4
  assert 'global_pred' not in teacher
  np.testing.assert_allclose(teacher['pixel_proj'], out['pixel_proj'], atol=1e-6)
  # The backbone and pixel branch are per sample: changing the other samples of the batch
  # leaves sample 0's pixel projection unchanged. The global heads normalise over the batch
  # (BYOL), so there the other samples do matter.
  other, _ = apply(params, x.at[1:].set(-x[1:] * 3.0))
  np.testing.assert_allclose(other['pixel_proj'][0], out['pixel_proj'][0], atol=1e-5)
  assert not np.allclose(other['pixel_proj'][1], out['pixel_proj'][1])
  assert not np.allclose(other['global_proj'][0], out['global_proj'][0])


def test_stabilizer_dropout_uses_rng(tiny):
  model, params, _ = tiny
  proj = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 16)), jnp.float32)

  @jax.jit
  def run(key):
    def stab(deterministic):
      return model.apply({'params': params}, proj, deterministic, method=PixSSLModel.stabilize,
                         rngs={'dropout': key})
    return stab(False), stab(True)

  (a, det_a), (b, det_b) = run(jax.random.key(1)), run(jax.random.key(2))
  assert a.shape == (2, 4, 4, 16) and not np.allclose(a, b)
  np.testing.assert_array_equal(np.asarray(det_a), np.asarray(det_b))


@pytest.mark.parametrize('name', config_loading._preset_names(  # pylint: disable=protected-access
    str(config_files.CONFIG_DIR / 'pretrain.py')))
def test_presets_build_and_trace(name):
  """Every config preset builds, initialises and runs (shape-checked by tracing only)."""
  config = config_files.load('pretrain', name)
  ndim, fields = config.data.ndim, config.model
  model = build_model(fields, ndim)
  shape = (2,) + tuple(config.data.patch_size) + (1,)
  params = jax.eval_shape(lambda k: init_params(model, k, (1,) + shape[1:]), INIT_KEY)
  out = jax.eval_shape(lambda p, x: model.apply({'params': p}, x), params,
                       jax.ShapeDtypeStruct(shape, jnp.float32))
  grid = tuple(p // 2 ** fields['pixel_level'] for p in config.data.patch_size)
  assert out['pixel_proj'].shape == (2, *grid, fields['pixel_proj_dim'])
  assert out['global_pred'].shape == (2, fields['proj_dim'])
  assert model.downsampling_factor == 2 ** (len(fields['features']) - 1)


def test_hypercolumn_concatenates_pooled_finer_levels():
  fields = dict(TINY, features=(8, 16, 32, 64))
  plain = build_model(_cfg(fields), ndim=2)
  hyper = build_model(_cfg(dict(fields, pixel_hypercolumn=True)), ndim=2)
  assert not plain.pixel_hypercolumn and hyper.pixel_hypercolumn
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 1)), jnp.float32)
  params = jax.jit(lambda k: init_params(hyper, k, (1, 16, 16, 1)))(INIT_KEY)
  # The projector reads 8 + 16 + 32 channels instead of 32; the backbone tree is unchanged.
  assert params['pixel_projector']['conv0']['kernel'].shape[0] == 56
  plain_params = jax.eval_shape(lambda k: init_params(plain, k, (1, 16, 16, 1)), INIT_KEY)
  assert (jax.tree.map(lambda a: a.shape, plain_params['backbone'])
          == jax.tree.map(lambda a: a.shape, params['backbone']))

  def features(p, x):
    _, decoder = UNet(2, fields['features'], 4).apply({'params': p['backbone']}, x)
    return decoder, hyper.apply({'params': p}, decoder, method=PixSSLModel.pixel_features)

  decoder, got = jax.jit(features)(params, x)
  assert got.shape == (2, 4, 4, 56)
  d0, d1, d2 = (np.asarray(f) for f in decoder[:3])
  np.testing.assert_allclose(got[..., :8], d0.reshape(2, 4, 4, 4, 4, 8).mean((2, 4)),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[..., 8:24], d1.reshape(2, 4, 2, 4, 2, 16).mean((2, 4)),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[..., 24:], d2)
  out = jax.jit(lambda p, x: hyper.apply({'params': p}, x))(params, x)
  assert out['pixel_proj'].shape == (2, 4, 4, fields['pixel_proj_dim'])


def test_model_runs_in_bfloat16(tiny):
  _, params, apply32 = tiny
  model16 = build_model(_cfg(TINY, 'bfloat16'), ndim=2)
  assert model16.dtype == jnp.bfloat16
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 16, 16, 1)), jnp.float32)
  out16 = jax.jit(lambda p, x: model16.apply({'params': p}, x))(params, x)
  out32, _ = apply32(params, x)
  for key in ('global_proj', 'global_pred', 'pixel_proj'):
    assert out16[key].dtype == jnp.float32
    a, b = np.asarray(out16[key]), np.asarray(out32[key])
    assert np.all(np.isfinite(a))
    # bf16 has 8 mantissa bits: close to float32, but not equal (it really ran in bf16).
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert 0 < rel < 0.1


@pytest.mark.parametrize('field,value,message', [
    ('dtype', 'float16', 'model.dtype'),
    ('features', (8, 10, 32), r'model.features\[1\]=10'),
    ('pixel_level', 3, 'model.pixel_level=3'),
    ('proj_hidden', 30, 'model.proj_hidden=30'),
    ('stabilizer_dropout', 1.0, 'model.stabilizer_dropout'),
])
def test_build_model_names_the_bad_field(field, value, message):
  cfg = _cfg(TINY)
  cfg[field] = value
  with pytest.raises(ValueError, match=message):
    build_model(cfg, ndim=2)


def test_init_params_rejects_bad_sample_shape():
  model = build_model(_cfg(TINY), ndim=2)
  with pytest.raises(ValueError, match='sample_shape'):
    init_params(model, INIT_KEY, (1, 16, 16))


def test_batch_pixel_norm_keeps_the_param_tree_and_centres_each_channel():
  """pixel_norm='batch' normalises over batch and positions: a channel constant over every
  pixel (the collapsed solution) becomes exactly the learned bias, whatever its value."""
  from pixssl_jax.models.heads import PixelProjector  # pylint: disable=g-import-not-at-top
  x = jnp.tile(jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, 16)), (2, 4, 4, 1))
  group, batch = (PixelProjector(32, 8, 4, norm=n) for n in ('group', 'batch'))
  params = group.init(jax.random.PRNGKey(1), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
      jnp.shape, batch.init(jax.random.PRNGKey(1), x))
  hidden = jnp.asarray(x) @ params['params']['conv0']['kernel'] + params['params']['conv0']['bias']
  assert float(jnp.std(hidden)) > 0.1  # Not trivially zero before the norm.
  out = batch.apply(params, x)
  expected = (jax.nn.relu(params['params']['norm']['bias'])
              @ params['params']['conv1']['kernel'] + params['params']['conv1']['bias'])
  # Rounding residue of (y - mean) is divided by sqrt(var + 1e-5), var ~ 0: about 1e-4.
  np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), atol=1e-3)


def _build(kind, ndim, layer_name):
  """The pre-training or segmentation model of the `tiny` presets with `model.layers` set."""
  config = config_files.load('pretrain' if kind == 'pretrain' else 'finetune', 'tiny')
  config.model.layers = layer_name
  if kind == 'pretrain':
    return build_model(config.model, ndim)
  config.model.head_level = 0
  return segmentation.build_segmentation_model(config.model, ndim, num_classes=3)


# The 3-D pre-training model covers every layer form (3-D convolutions, the pixel projector's
# dense layers); the 2-D segmentation model the head.
@pytest.mark.parametrize('kind,ndim', [('pretrain', 3), ('segmentation', 2)])
def test_flax_and_cpu_layer_sets_have_one_param_tree_and_compute_the_same(kind, ndim):
  models = {name: _build(kind, ndim, name) for name in ('flax', 'cpu')}
  assert models['flax'].layers is layers.FLAX and models['cpu'].layers is layers.CPU
  shape = (2,) + (16,) * ndim + (1,)
  if kind == 'pretrain':
    init = lambda m, k: init_params(m, k, (1,) + shape[1:])
  else:
    init = lambda m, k: segmentation.init_segmentation_params(m, k, (1,) + shape[1:])
  trees = {name: jax.eval_shape(lambda k, m=m: init(m, k), INIT_KEY)
           for name, m in models.items()}
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), trees['flax'])
          == jax.tree.map(lambda a: (a.shape, a.dtype), trees['cpu']))
  assert set(trees['flax']['backbone']['enc0']) == {'conv0', 'conv1', 'norm0', 'norm1'}
  params = jax.jit(lambda k: init(models['flax'], k))(INIT_KEY)
  params = jax.tree.map(lambda p: p + 0.05, params)  # Nonzero biases, reaching the norms.
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  dropout = jax.random.key(3)

  def run(model, params, x):
    if kind == 'segmentation':
      return {'logits': model.apply({'params': params}, x)}
    out = model.apply({'params': params}, x, method=PixSSLModel.init_all)
    # An MC-dropout sample: the masks are drawn the same way whatever the layer set.
    out['sampled'] = model.apply({'params': params}, out['pixel_proj'], False,
                                 method=PixSSLModel.stabilize, rngs={'dropout': dropout})
    return out

  outs = {name: jax.jit(run, static_argnums=0)(m, params, x) for name, m in models.items()}
  assert outs['flax'].keys() == outs['cpu'].keys()
  for key, expected in outs['flax'].items():
    scale = float(jnp.max(jnp.abs(expected)))
    assert scale > 0
    np.testing.assert_allclose(outs['cpu'][key], expected, rtol=0, atol=1e-4 * scale,
                               err_msg=key)


def test_layer_set_names():
  assert layers.layer_set('flax') is layers.FLAX and layers.layer_set('cpu') is layers.CPU
  # 'auto': the CPU forms exactly when JAX runs on the CPU (as the tests do here).
  expected = layers.CPU if jax.default_backend() == 'cpu' else layers.FLAX
  assert layers.layer_set('auto') is expected
  with pytest.raises(ValueError, match=r"model\.layers='gpu'.*'auto', 'flax', 'cpu'"):
    layers.layer_set('gpu')
  # A run's config.json written before the field existed reads back with 'auto'.
  config = config_files.load('pretrain', 'tiny')
  del config.model['layers']
  assert build_model(config_upgrade.upgrade(config).model, 2).layers is expected


def test_module_defaults_are_the_config_defaults():
  # The configs are the one source of defaults: a model built without a config must agree.
  config = config_files.load('pretrain', 'demo').model
  model = PixSSLModel(ndim=2)
  for field in ('features', 'num_groups', 'proj_hidden', 'proj_dim', 'pixel_level',
                'pixel_hypercolumn', 'pixel_proj_dim', 'stabilizer_hidden',
                'stabilizer_dropout', 'head_norm', 'pixel_norm'):
    assert getattr(model, field) == config[field], field
