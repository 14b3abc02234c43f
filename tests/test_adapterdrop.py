"""AdapterDrop (Rücklé et al. 2021): adapters in upper layers only, dropped at random while
training, and skipped at inference.

* With adapters in the upper half and `trainable=peft`, the compiled step's backward pass
  ends at the lowest adapter (XLA's FLOP count), with no stop-gradient in the model.
* `drop_lowest=k`: each step draws k' in 0..k from its dropout key and the adapters of the
  lowest k' layers act as the identity; k' = 0 is the plain step bit for bit.
* `compose skip`: an artifact without its lowest adapters predicts what the model with those
  adapters zeroed predicts.
"""

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapter_tuning import compose, config as config_lib
from adapter_tuning.data import demo
from adapter_tuning.errors import UsageError
from adapter_tuning.interop import artifact
from adapter_tuning.interop.pretrained import load_pretrained
from adapter_tuning.models.encoder import ModelConfig
from adapter_tuning.models.heads import TaskModel
from adapter_tuning.peft.bottleneck import AdapterConfig, lowest_dropped
from adapter_tuning.predict import predict_rows
from adapter_tuning.serving.multi_adapter import MultiTaskModel
from adapter_tuning.training import steps, trainable as tl
from adapter_tuning.training.optim import make_optimizer
from conftest import GLUE_DIR
from helpers import tiny_config

LAYERS = 4
GEOMETRY = ModelConfig(vocab_size=100, hidden_size=64, num_layers=LAYERS, num_heads=2,
                       intermediate_size=256, max_positions=64)
NO_DROPOUT = ModelConfig(**{**GEOMETRY.__dict__, 'hidden_dropout': 0.0,
                            'attention_dropout': 0.0})


def _params(model, adapter):
  """Random base and head, adapters far from the identity (so dropping one shows)."""
  ids = jnp.zeros((1, 8), jnp.int32)
  params = jax.tree.map(np.array, model.init(jax.random.PRNGKey(0), ids, ids + 1, ids)['params'])
  for i in range(LAYERS if adapter else 0):
    adapter.init_layer(params['encoder'][f'layer_{i}'], i)
  params['head']['kernel'] = np.random.default_rng(1).normal(0, 0.5, (64, 2)).astype(np.float32)
  return params


def _batch(b=8, t=32):
  rng = np.random.default_rng(0)
  return {'input_ids': jnp.asarray(rng.integers(1, 100, (b, t)), jnp.int32),
          'attention_mask': jnp.ones((b, t), jnp.int32),
          'token_type_ids': jnp.zeros((b, t), jnp.int32),
          'labels': jnp.asarray(rng.integers(0, 2, b), jnp.int32)}


def _flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])


def test_backward_pass_stops_at_the_lowest_adapter():
  # The loss and gradient the train step computes (steps.task_loss over the trainable
  # subtree only), compiled: XLA's FLOP count shows where the backward pass ends.
  b = _batch()
  args = (b['input_ids'], b['attention_mask'], b['token_type_ids'])
  flops = {}
  for name, layers in (('upper', (2, 3)), ('all', None)):
    adapter = AdapterConfig(size=8, layers=layers)
    model = TaskModel(GEOMETRY, adapter, 'classification', 2)
    train_p, frozen_p = tl.split(_params(model, adapter), tl.resolve('peft', LAYERS))
    loss = lambda p, f, model=model: steps.task_loss(
        'classification', model.apply({'params': tl.merge(p, f)}, *args), b)
    flops[name] = _flops(jax.grad(loss), train_p, frozen_p)
    flops[f'{name}_forward'] = _flops(loss, train_p, frozen_p)
  # all: forward + input gradients through 4 layers (~2x forward); upper: through 2 of 4.
  ratio = flops['upper'] / flops['all']
  assert 0.70 < ratio < 0.80, flops
  assert flops['upper'] > 1.3 * flops['upper_forward'], flops


def _zeroed_below(params, j):
  """The params with every adapter of layers < j set to zero (exactly the identity)."""
  flat = tu.flatten_dict(params)
  return tu.unflatten_dict({k: (np.zeros_like(v) if k[1] in {f'layer_{i}' for i in range(j)}
                                and k[2].endswith('_adapter') else v) for k, v in flat.items()})


@pytest.mark.parametrize('remat', [False, True])
def test_random_lowest_k_drop_follows_the_step_key(remat):
  adapter = AdapterConfig(size=8, init_scale=0.1, drop_lowest=3)
  model = TaskModel(NO_DROPOUT, adapter, 'classification', 2, remat=remat)
  plain = TaskModel(NO_DROPOUT, AdapterConfig(size=8), 'classification', 2)
  params, b = _params(model, adapter), _batch()
  args = (b['input_ids'], b['attention_mask'], b['token_type_ids'])
  train = jax.jit(lambda key: model.apply({'params': params}, *args, deterministic=False,
                                          rngs={'dropout': key}))
  evaluate = jax.jit(lambda p: plain.apply({'params': p}, *args))
  seen = set()
  for seed in range(6):
    key = jax.random.PRNGKey(seed)
    j = int(lowest_dropped(key, 3))
    seen.add(j)
    want = evaluate(_zeroed_below(params, j))
    np.testing.assert_allclose(train(key), want, rtol=1e-5, atol=1e-5, err_msg=f'k\'={j}')
  assert len(seen) >= 3, seen  # the draw changes with the key
  evaluated = model.apply({'params': params}, *args)  # no dropout stream: every adapter runs
  np.testing.assert_allclose(evaluated, evaluate(params), rtol=1e-5, atol=1e-5)


def _train_step(drop_lowest):
  """seed -> the trainable params after the first two train steps of a run with that seed
  (step 0 has learning rate 0: the warm-up starts there)."""
  adapter = AdapterConfig(size=8, init_scale=0.1, drop_lowest=drop_lowest)
  model = TaskModel(GEOMETRY, adapter, 'classification', 2)  # dropout on
  tx = make_optimizer(config_lib.get_config(), 10)
  train_p, frozen_p = tl.split(_params(model, adapter), tl.resolve('peft', LAYERS))
  step = jax.jit(steps.make_train_step(model, tx, 'classification'))

  def run(seed):
    state = steps.init_state(train_p, tx, seed)
    for _ in range(2):
      state, _ = step(state, frozen_p, _batch())
    return jax.tree.map(np.asarray, state['params'])
  return run


def test_no_drop_is_the_plain_step_exactly():
  # Step s draws k' from its dropout key fold_in(PRNGKey(seed), s) (steps.make_train_step):
  # a seed whose two steps both draw k' = 0 trains exactly as drop_lowest=0 does.
  k_of = lambda seed: [int(lowest_dropped(jax.random.fold_in(jax.random.PRNGKey(seed), s), 2))
                       for s in range(2)]
  none_dropped = next(s for s in range(100) if k_of(s) == [0, 0])
  some_dropped = next(s for s in range(100) if k_of(s)[1] > 0)
  plain, dropping = _train_step(0), _train_step(2)
  jax.tree.map(np.testing.assert_array_equal, plain(none_dropped), dropping(none_dropped))
  differs = jax.tree.map(lambda x, y: not np.array_equal(x, y), plain(some_dropped),
                         dropping(some_dropped))
  assert any(jax.tree.leaves(differs))


def test_drop_lowest_with_the_layer_scan_is_refused():
  config = config_lib.get_config()
  config.model.adapter.drop_lowest = 2
  config.model.scan_layers = True
  with pytest.raises(UsageError, match='drop_lowest.*model.scan_layers=false'):
    config_lib.validate(config)
  config.model.adapter.drop_lowest = -1
  config.model.scan_layers = False
  with pytest.raises(UsageError, match='drop_lowest must be an integer >= 0'):
    config_lib.validate(config)


def test_skipping_the_lowest_adapters_equals_zeroing_them(tmp_path):
  from adapter_tuning.training.trainer import train_and_evaluate
  base = demo.ensure_checkpoint(tmp_path / 'base')  # 2 layers
  config = tiny_config(base, 'glue/sst2', **{
      'data.source': 'glue_dir', 'data.data_dir': str(GLUE_DIR), 'data.max_train_examples': 64,
      'data.max_eval_examples': 32, 'data.num_buckets': 1, 'model.adapter.init_scale': 0.3,
      'model.adapter.drop_lowest': 1})
  train_and_evaluate(config, tmp_path / 'run')
  full = tmp_path / 'run' / 'adapter'
  skipped = tmp_path / 'skipped'
  assert compose.main(['skip', '--adapter', str(full), '--lowest', '1',
                       '--output', str(skipped)]) == 0
  meta, trained = artifact.load(skipped)
  assert meta['peft']['bottleneck']['layers'] == [1]
  assert 'attention_adapter' not in trained['encoder']['layer_0']
  assert 'attention_layer_norm' in trained['encoder']['layer_0']  # LayerNorms stay

  rows = [{'text': t} for t in ('a fine film', 'dull and tedious', 'ok', 'not good')]
  served = np.array([r['logits'] for r in predict_rows(MultiTaskModel([skipped]), rows, 4, 32)])
  full_meta, full_trained = artifact.load(full)
  pre = load_pretrained(base, AdapterConfig.from_any(full_meta['adapter']))
  model = TaskModel(pre.config, pre.adapter, 'classification', 2)
  params = tl.merge(full_trained, {'encoder': pre.params, 'head': full_trained['head']})
  batch = pre.tokenizer.pad(*pre.tokenizer.tokenize([r['text'] for r in rows], None, 32))
  logits = lambda p: np.asarray(model.apply({'params': p}, batch['input_ids'],
                                            batch['attention_mask'], batch['token_type_ids']))
  np.testing.assert_allclose(served, logits(_zeroed_below(params, 1)), atol=1e-5)
  assert not np.allclose(served, logits(params), atol=1e-4)  # the skipped adapter mattered
