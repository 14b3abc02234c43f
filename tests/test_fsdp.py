"""The fsdp mesh axis on 8 fake CPU devices, with MiniLM from ../shared (training/parallel.py).

One subprocess (the device count must be set before JAX starts) trains the same adapter
steps on one device, on fsdp=8 (unrolled, and scanned with full remat) and on data=2 x
fsdp=4, and full fine-tuning with split trained matrices, and checks that losses and params
agree to 1e-5, that each device holds 1/N of every split frozen matrix, that a checkpoint
written under one mesh restores under the other bit for bit and trains on exactly as the
state handed over in memory does, and that a base born sharded reads each slice once.
"""

import subprocess
import sys

from helpers import ROOT, _env

SCRIPT = r'''
import pathlib, sys
import flax.traverse_util as tu
import jax, ml_collections, numpy as np
from jax.sharding import Mesh
from adapter_tuning import load_pretrained, peft
from adapter_tuning.interop import hf_checkpoint
from adapter_tuning.models.heads import TaskModel
from adapter_tuning.training import parallel, steps, trainable as tl
from adapter_tuning.training.checkpointing import Checkpointer
from adapter_tuning.training.optim import make_optimizer

MINILM, TMP = sys.argv[1], pathlib.Path(sys.argv[2])
assert jax.device_count() == 8
pre = load_pretrained(MINILM, {'size': 16, 'init_scale': 1e-2})
model = TaskModel(pre.config, pre.adapter, 'classification', 2)
rng = np.random.default_rng(0)
head = {'kernel': rng.normal(0, 0.02, (384, 2)).astype(np.float32), 'bias': np.zeros(2, np.float32)}
train, frozen = tl.split({'encoder': pre.params, 'head': head},
                         tl.resolve('adapters', pre.config.num_layers))
opt = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_ratio=0.0, weight_decay=0.01,
                                     adam_b1=0.9, adam_b2=0.999, adam_eps=1e-6, grad_clip_norm=1.0))
tx = make_optimizer(opt, 10)

def batch(i):
  r = np.random.default_rng(i)
  mask = np.ones((16, 32), np.int32)
  mask[::2, 20:] = 0  # padding in half the rows
  return {'input_ids': r.integers(1000, 30000, (16, 32)).astype(np.int32), 'attention_mask': mask,
          'token_type_ids': np.zeros((16, 32), np.int32),
          'labels': r.integers(0, 2, 16).astype(np.int32)}
BATCHES = [batch(i) for i in range(4)]

class OnMesh:
  """The trainer's placement and jitted step on one mesh."""
  def __init__(self, mesh, train=train, frozen=frozen, model=model):
    self.train = train
    self.sh = parallel.state_shardings(
        jax.eval_shape(lambda p: steps.init_state(p, tx, 0), train), mesh)
    frozen_sh = parallel.frozen_shardings(frozen, mesh)
    self.frozen = parallel.put(frozen, frozen_sh)
    self.rows = parallel.batch_sharded(mesh)
    self.step = jax.jit(steps.make_train_step(model, tx, 'classification'),
                        in_shardings=(self.sh, frozen_sh, self.rows),
                        out_shardings=(self.sh, parallel.replicated(mesh)), donate_argnums=(0,))
  def init(self):
    return jax.jit(lambda p: steps.init_state(p, tx, 0), out_shardings=self.sh)(
        parallel.put(self.train, self.sh['params']))
  def run(self, state, batches):
    losses = []
    for b in batches:  # wait on every step: fake devices deadlock on piled-up collectives
      state, metrics = self.step(state, self.frozen, parallel.to_global(b, self.rows))
      losses.append(float(metrics['loss']))
    return state, losses

def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

def bitwise(a, b):
  la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))

meshes = {'one': OnMesh(Mesh(np.asarray(jax.devices()[:1]), ('data',))),
          'fsdp8': OnMesh(parallel.make_mesh(8)), 'data2_fsdp4': OnMesh(parallel.make_mesh(4))}
assert parallel.make_mesh(4).devices.shape == (2, 4)
ref_state, ref_losses = meshes['one'].run(meshes['one'].init(), BATCHES[:3])
assert len(set(ref_losses)) == 3, ref_losses
for name in ('fsdp8', 'data2_fsdp4'):
  state, losses = meshes[name].run(meshes[name].init(), BATCHES[:3])
  assert np.allclose(losses, ref_losses, atol=1e-5, rtol=0), (name, losses, ref_losses)
  d = max_diff(state['params'], ref_state['params'])
  assert d <= 1e-5, (name, d)
  assert max_diff(state['opt_state'], ref_state['opt_state']) <= 1e-5, name
  print(name, 'max param diff', d)
# The large-base recipe, a scanned layer stack with full remat, on fsdp8: the same steps.
scanned = OnMesh(parallel.make_mesh(8), model=TaskModel(pre.config, pre.adapter, 'classification',
                                                        2, remat='full', scan=True))
state, losses = scanned.run(scanned.init(), BATCHES[:3])
assert np.allclose(losses, ref_losses, atol=1e-5, rtol=0), ('scan', losses, ref_losses)
assert max_diff(state['params'], ref_state['params']) <= 1e-5

# Each device holds 1/N of every split frozen matrix; only small vectors stay whole.
for name, n in (('fsdp8', 8), ('data2_fsdp4', 4)):
  split = 0
  for path, x in tu.flatten_dict(meshes[name].frozen).items():
    shards = x.addressable_shards
    assert len(shards) == 8
    if x.size >= parallel.MIN_FROZEN_ELEMENTS:
      split += 1
      assert all(s.data.size * n == x.size for s in shards), (name, path)
      pieces = {tuple((i.start, i.stop) for i in s.index) for s in shards}
      assert len(pieces) == n, (name, path)  # n distinct pieces
      whole = np.asarray(x)
      for s in shards:
        assert np.array_equal(np.asarray(s.data), whole[s.index])
    else:
      assert x.sharding.is_fully_replicated, (name, path)
  assert split >= 6 * pre.config.num_layers, (name, split)  # q, k, v, out, ffn in, ffn out
kernel = meshes['fsdp8'].frozen['encoder']['layer_0']['intermediate']['kernel']
assert kernel.shape == (384, 1536) and kernel.addressable_shards[0].data.shape == (384, 192)

# Full fine-tuning with trained matrices split too (the threshold lowered to MiniLM's size):
# params and Adam moments 1/8 per device, the same steps as on one device.
parallel.MIN_TRAINED_ELEMENTS = 2 ** 14
full = tl.split({'encoder': pre.params, 'head': head}, tl.resolve('full', 6))
one_full = OnMesh(Mesh(np.asarray(jax.devices()[:1]), ('data',)), *full)
eight_full = OnMesh(parallel.make_mesh(8), *full)
ref_state, ref_losses = one_full.run(one_full.init(), BATCHES[:2])
state, losses = eight_full.run(eight_full.init(), BATCHES[:2])
assert np.allclose(losses, ref_losses, atol=1e-5, rtol=0), (losses, ref_losses)
assert max_diff(state['params'], ref_state['params']) <= 1e-5
mu = state['opt_state'][1][0].mu['encoder']['layer_0']['output']['kernel']
assert mu.shape == (1536, 384) and mu.addressable_shards[0].data.shape == (192, 384)
parallel.MIN_TRAINED_ELEMENTS = 2 ** 22

# A checkpoint saved under one mesh restores under the other bit for bit, and trains on
# exactly as the same state handed over in memory (the uninterrupted run).
for src, dst in (('fsdp8', 'one'), ('one', 'fsdp8')):
  state, _ = meshes[src].run(meshes[src].init(), BATCHES[:2])
  saved = jax.device_get(state)
  ckpt = Checkpointer(TMP / f'{src}_to_{dst}', 2)
  ckpt.save(2, state, {'step': 2})
  ckpt.close()
  ckpt = Checkpointer(TMP / f'{src}_to_{dst}', 2)
  restored, meta, step = ckpt.restore(parallel.abstract(saved, meshes[dst].sh))
  ckpt.close()
  assert step == 2 and meta['step'] == 2 and bitwise(restored, saved), (src, dst)
  assert all(r.sharding == s for r, s in zip(jax.tree.leaves(restored),
                                             jax.tree.leaves(meshes[dst].sh)))
  resumed, resumed_losses = meshes[dst].run(restored, BATCHES[2:])
  handed, handed_losses = meshes[dst].run(parallel.put(saved, meshes[dst].sh), BATCHES[2:])
  assert resumed_losses == handed_losses and bitwise(resumed, handed), (src, dst)
  print(src, '->', dst, 'resumed bit for bit')

# Born sharded (data=2 x fsdp=4): every param equals the whole-file load, and each slice
# two devices hold is read once: the bytes read are those of the tensors used, not more.
mesh = parallel.make_mesh(4)
shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), pre.params)
flat_shapes = tu.flatten_dict(shapes)
loaded, unused, reader = hf_checkpoint.load_encoder_sharded(
    pre.directory, shapes, 'bert', pre.config,
    lambda p: parallel.frozen_shardings(flat_shapes[p], mesh))
flat_loaded, flat_pre = tu.flatten_dict(loaded), tu.flatten_dict(pre.params)
assert len(flat_loaded) == len([p for p in flat_pre if not peft.is_method_param(p)])
for path, x in flat_loaded.items():
  assert np.array_equal(np.asarray(x), flat_pre[path]), path
used = sum(x.size * 4 for x in flat_loaded.values())
assert reader.bytes_read == used, (reader.bytes_read, used)
# A host holding one fsdp piece of a matrix reads that piece only.
before = reader.bytes_read
piece = hf_checkpoint.read_converted(reader, 'encoder.layer.0.attention.self.query.weight',
                                     'attn_in', 'kernel', (384, 12, 32),
                                     (slice(96, 192), slice(None), slice(None)))
assert np.array_equal(piece, flat_pre[('layer_0', 'attention', 'query', 'kernel')][96:192])
assert reader.bytes_read - before == 384 * 384 * 4 // 4
print('ok')
'''


def test_fsdp_trains_like_one_device_and_resumes_across_meshes(tmp_path, minilm_dir):
  proc = subprocess.run([sys.executable, '-c', SCRIPT, str(minilm_dir), str(tmp_path)],
                        cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and proc.stdout.strip().endswith('ok'), (
      proc.stdout[-2000:] + proc.stderr[-4000:])
