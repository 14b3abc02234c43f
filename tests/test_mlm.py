"""Masked-LM adapters (data.task=mlm; data/mlm.py, models/mlm_head.py, heads.MaskedLM).

- BERT's masking: share, 80/10/10, never special tokens, determinism by (seed, epoch,
  example), resume mid-epoch, eval masks independent of seed and batching;
- parity of the LM head with transformers' *ForMaskedLM on tiny random checkpoints (zero
  adapters), the loaded head being the checkpoint's tensors;
- the pretrained head frozen under the PEFT presets, an initialised one trained;
- real text: MiniLM (no MLM head: initialised) adapting to SST-2 sentences through the
  trainer lowers masked-LM perplexity on held-out SST-2 dev sentences;
- bad configs: one line each.
"""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers

from adapter_tuning import load_pretrained
from adapter_tuning.config import validate
from adapter_tuning.data import batching, mlm
from adapter_tuning.errors import UsageError
from adapter_tuning.interop import artifact
from adapter_tuning.interop.tokenization import load_tokenizer
from adapter_tuning.models import mlm_head
from adapter_tuning.models.heads import TaskModel
from adapter_tuning.training import trainable
from helpers import read_metrics, run_train, tiny_config

TINY = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)


def _sst2(glue_dir, split: str, n: int) -> list[str]:
  lines = (glue_dir / 'SST-2' / f'{split}.tsv').read_text().splitlines()[1:n + 1]
  return [line.split('\t')[0].strip() for line in lines]


@pytest.fixture(scope='module')
def tokenized():
  from conftest import GLUE_DIR, MINILM
  tok = load_tokenizer(MINILM, 'bert', 0)
  ids, types = tok.tokenize(_sst2(GLUE_DIR, 'train', 1024), None, 48)
  return tok, ids, types


def test_masking_follows_bert_recipe(tokenized):
  tok, ids, types = tokenized
  masking = mlm.masking_for(tok, 0.15)
  index = np.arange(len(ids), dtype=np.int32)
  batches = list(batching.train_batches(ids, types, index, 64, seed=3, epoch=0,
                                        boundaries=(16, 32, 48)))
  chosen = kept = masked = randomised = long_chosen = long_candidates = 0
  for raw in batches:
    b = masking.train(raw, seed=3, epoch=0)
    length = b['input_ids'].shape[1]
    assert b['mlm_positions'].shape == (64, masking.num_slots(length))
    for r in range(64):
      original = ids[raw['labels'][r]]
      n_cand = int(np.sum(~np.isin(original, masking.special_ids)))
      w = b['mlm_weights'][r] > 0
      pos = b['mlm_positions'][r][w]
      assert w.sum() == max(1, int(np.floor(0.15 * n_cand + 0.5)))  # round(p n), at least 1
      assert not np.isin(original[pos], masking.special_ids).any()  # never [CLS]/[SEP]/[UNK]
      assert np.array_equal(b['mlm_ids'][r][w], original[pos])
      others = np.setdiff1d(np.arange(len(original)), pos)
      assert np.array_equal(b['input_ids'][r][others], original[others])  # only chosen change
      assert np.all(b['input_ids'][r][len(original):] == tok.pad_id)
      now = b['input_ids'][r][pos]
      masked += int(np.sum(now == masking.mask_id))
      kept += int(np.sum(now == original[pos]))
      randomised += int(np.sum((now != masking.mask_id) & (now != original[pos])))
      assert not np.isin(now[now != original[pos]], masking.special_ids[
          masking.special_ids != masking.mask_id]).any()
      chosen += len(pos)
      if n_cand >= 20:  # short phrases mask more than 15%: at least one token each
        long_chosen, long_candidates = long_chosen + len(pos), long_candidates + n_cand
  assert abs(long_chosen / long_candidates - 0.15) < 0.005, long_chosen / long_candidates
  assert abs(masked / chosen - 0.8) < 0.02 and abs(kept / chosen - 0.1) < 0.015
  assert abs(randomised / chosen - 0.1) < 0.015, (masked, kept, randomised, chosen)


def test_masks_are_deterministic_and_resume_exactly(tokenized):
  tok, ids, types = tokenized
  masking = mlm.masking_for(tok, 0.15)
  index = np.arange(len(ids), dtype=np.int32)
  one_epoch = lambda seed, epoch, start=0: [masking.train(b, seed, epoch) for b in
                                            batching.train_batches(
                                                ids, types, index, 32, seed=seed, epoch=epoch,
                                                boundaries=(48,), start_batch=start)]
  first, again = one_epoch(0, 1), one_epoch(0, 1)
  for a, b in zip(first, again):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  resumed = one_epoch(0, 1, start=5)  # a run resumed at batch 5 of the epoch
  for a, b in zip(first[5:], resumed):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  other_epoch = one_epoch(0, 2)
  assert not np.array_equal(first[0]['mlm_positions'], other_epoch[0]['mlm_positions'])
  # Eval masks: fixed per example, whatever the batch size (and not tied to config.seed).
  by_example = {}
  for size in (8, 48):
    for b in batching.eval_batches(ids[:96], types[:96], np.zeros(96, np.int32), size, (48,)):
      index_b = b.pop('index')
      out = masking.evaluate({k: v for k, v in b.items() if k not in ('mask', 'labels')},
                             index_b)
      for r, i in enumerate(index_b):
        if i >= 0:
          w = out['mlm_weights'][r] > 0
          by_example.setdefault(int(i), []).append(out['mlm_positions'][r][w].tolist())
  assert all(a == b for a, b in by_example.values()) and len(by_example) == 96


def _perturb_head(model, prefixes):
  """Non-trivial head weights (HF starts LN at 1/0 and the bias at 0), so names matter."""
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.startswith(prefixes):
        param.add_(torch.randn_like(param) * 0.3)


def _bert(directory, minilm_dir):
  config = transformers.BertConfig(vocab_size=30522, hidden_size=32, **TINY)
  model = transformers.BertForMaskedLM(config).eval()
  _perturb_head(model, ('cls.',))
  return model, 'cls.predictions', minilm_dir / 'tokenizer.json'


def _roberta(directory, minilm_dir):
  from tokenizers import ByteLevelBPETokenizer
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator(['hello world, this is a small corpus for roberta'] * 10,
                          vocab_size=300,
                          special_tokens=['<s>', '<pad>', '</s>', '<unk>', '<mask>'])
  bpe.save(str(directory / 'tokenizer.json'))
  config = transformers.RobertaConfig(vocab_size=300, hidden_size=32, type_vocab_size=1,
                                      **{**TINY, 'max_position_embeddings': 66})
  model = transformers.RobertaForMaskedLM(config).eval()
  _perturb_head(model, ('lm_head.',))
  return model, 'lm_head', None


def _distilbert(directory, minilm_dir):
  config = transformers.DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=4,
                                         hidden_dim=64, max_position_embeddings=64)
  model = transformers.DistilBertForMaskedLM(config).eval()
  _perturb_head(model, ('vocab_',))
  return model, 'vocab_', minilm_dir / 'tokenizer.json'


def _electra_generator(directory, minilm_dir):
  config = transformers.ElectraConfig(vocab_size=30522, embedding_size=16, hidden_size=32,
                                      **TINY)
  model = transformers.ElectraForMaskedLM(config).eval()
  _perturb_head(model, ('generator_',))
  return model, 'generator_', minilm_dir / 'tokenizer.json'


def _deberta_v3(directory, minilm_dir):
  from test_deberta import TINY as DEBERTA, V3
  model = transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(**DEBERTA, **V3)).eval()
  _perturb_head(model, ('cls.',))
  return model, 'cls.predictions', minilm_dir / 'tokenizer.json'


@pytest.mark.parametrize('make', [_bert, _roberta, _distilbert, _electra_generator,
                                  _deberta_v3])
def test_lm_head_matches_transformers(tmp_path, minilm_dir, make):
  torch.manual_seed(0)
  model, names, tokenizer_json = make(tmp_path, minilm_dir)
  model.save_pretrained(tmp_path)
  if tokenizer_json:
    shutil.copyfile(tokenizer_json, tmp_path / 'tokenizer.json')
  pre = load_pretrained(tmp_path, {'size': 8, 'init_scale': 0.0})  # zero adapters
  head, source = mlm_head.load_or_init(pre.directory, pre.config, 0)
  assert source.loaded and names in source.names
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  layout = mlm_head.layouts(pre.config.family)[0]
  np.testing.assert_array_equal(head['dense']['kernel'], state[f'{layout.dense}.weight'].T)
  np.testing.assert_array_equal(head['layer_norm']['scale'], state[f'{layout.layer_norm}.weight'])
  np.testing.assert_array_equal(head['bias'], state[layout.bias[0]])
  rng = np.random.default_rng(0)
  vocab = pre.config.vocab_size
  ids = rng.integers(5, vocab, size=(3, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 8:], mask[2, 5:] = 0, 0
  ids[mask == 0] = pre.config.pad_token_id
  types = np.zeros_like(ids)
  inputs = {'input_ids': torch.tensor(ids, dtype=torch.long),
            'attention_mask': torch.tensor(mask, dtype=torch.long)}
  with torch.no_grad():
    theirs = model(**inputs).logits.numpy()
  task = TaskModel(pre.config, pre.adapter, 'mlm', 0)
  params = {'params': {'encoder': pre.params, 'head': head}}
  ours = np.asarray(task.apply(params, ids, mask, types))
  real = mask.astype(bool)
  diff = float(np.max(np.abs(ours[real] - theirs[real])))
  print(f'{pre.config.family}: max |logit diff| {diff:.2e} (logits spread '
        f'{float(np.ptp(theirs[real])):.1f})')
  assert diff <= 1e-4
  positions = np.asarray([[1, 3], [0, 7], [4, 2]], np.int32)
  gathered = np.asarray(task.apply(params, ids, mask, types, positions_BxP=positions))
  np.testing.assert_allclose(gathered, np.take_along_axis(ours, positions[..., None], 1),
                             atol=1e-5, rtol=0)


def test_head_initialised_without_checkpoint_head_and_presets(minilm_dir):
  from adapter_tuning.interop.hf_checkpoint import read_model_config
  config = read_model_config(minilm_dir)
  head, source = mlm_head.load_or_init(minilm_dir, config, 7)
  assert not source.loaded and 'initialised' in source.note()
  assert abs(float(head['dense']['kernel'].std()) - 0.02) < 1e-3
  assert np.all(head['layer_norm']['scale'] == 1) and np.all(head['bias'] == 0)
  assert head['bias'].shape == (config.vocab_size,)
  rules = trainable.resolve('peft', 6)
  frozen = trainable.with_pretrained_head('peft', rules)
  assert not trainable.decide(frozen, 'head/dense/kernel')
  assert not trainable.decide(trainable.with_pretrained_head('adapters', trainable.resolve(
      'adapters', 6)), 'head/layer_norm/scale')  # the head's LN is not "every LayerNorm"
  assert trainable.decide(rules, 'head/bias')  # an initialised head trains
  assert trainable.with_pretrained_head('full', trainable.FULL) == trainable.FULL
  with pytest.raises(UsageError, match='no masked-LM head for model_type .modernbert.*bert'):
    mlm_head.layouts('modernbert')


def _mlm_config(checkpoint, train_file, eval_file, **overrides):
  return tiny_config(checkpoint, 'mlm', **{
      'data.source': 'files', 'data.train_file': str(train_file),
      'data.eval_file': str(eval_file), 'data.num_buckets': 1, 'log_every_steps': 10,
      **overrides})


def test_mlm_adapter_lowers_heldout_perplexity(tmp_path, minilm_dir):
  """MiniLM (a sentence-transformers save: no MLM head, so it is initialised and trains)
  with Houlsby adapters on 2,000 SST-2 training sentences (.txt), perplexity on 128 SST-2
  dev sentences (TSV, `sentence` column) before and after 30 steps through the trainer."""
  from conftest import GLUE_DIR
  from adapter_tuning.training import evaluation, parallel, steps
  from adapter_tuning.training.build import build, length_buckets
  (tmp_path / 'train.txt').write_text('\n'.join(_sst2(GLUE_DIR, 'train', 2000)) + '\n')
  config = _mlm_config(minilm_dir, tmp_path / 'train.txt', GLUE_DIR / 'SST-2' / 'dev.tsv',
                       **{'data.text_key': 'sentence', 'data.max_eval_examples': 128,
                          'num_train_steps': 30, 'eval_every_steps': 15,
                          'learning_rate': 2e-3, 'trainable': 'peft'})
  validate(config)
  setup = build(config, tmp_path / 'w0')
  _, eval_bounds = length_buckets(config, setup.data)
  mesh = parallel.make_mesh()
  before = evaluation.evaluate_all(
      jax.jit(steps.make_eval_step(setup.model, 'mlm')), setup.params, setup.data, config,
      eval_bounds, parallel.batch_sharded(mesh), setup.pretrained.tokenizer.pad_id).metrics
  from adapter_tuning.training.trainer import train_and_evaluate
  after = train_and_evaluate(config, tmp_path / 'run')
  print(f'held-out perplexity {before["eval/perplexity"]:.1f} -> {after["eval/perplexity"]:.1f}'
        f' (loss {before["eval/loss"]:.3f} -> {after["eval/loss"]:.3f}, masked-token '
        f'accuracy {before["eval/accuracy"]:.3f} -> {after["eval/accuracy"]:.3f})')
  assert after['eval/loss'] < before['eval/loss'] - 1.0
  assert after['eval/perplexity'] < 0.3 * before['eval/perplexity']
  evals = [m['eval/perplexity'] for m in read_metrics(tmp_path / 'run') if 'eval/perplexity' in m]
  best = json.loads((tmp_path / 'run' / 'adapter_best' / 'config.json').read_text())
  assert best['final_metrics']['eval/perplexity'] == min(evals)  # selection minimises it
  meta, weights = artifact.load(tmp_path / 'run' / 'adapter')
  assert meta['head'] == 'mlm' and meta['task'].startswith('mlm/')
  assert 'dense' in weights['head'] and 'layer_0' in weights['encoder']  # head trained too
  artifact.check_weights(tmp_path / 'run' / 'adapter', meta, weights, setup.pretrained.config)
  from adapter_tuning.serving.multi_adapter import MultiTaskModel
  with pytest.raises(UsageError, match='predicts no task labels.*model.stack.below'):
    MultiTaskModel([tmp_path / 'run' / 'adapter'])


def test_pretrained_head_stays_frozen_through_the_trainer(tmp_path, minilm_dir, capsys):
  torch.manual_seed(0)
  model, _, tokenizer_json = _bert(tmp_path, minilm_dir)
  base = tmp_path / 'base'
  model.save_pretrained(base)
  shutil.copyfile(tokenizer_json, base / 'tokenizer.json')
  (tmp_path / 'text.txt').write_text('the cat sat on the mat\nthe dog sat on the log\n' * 40)
  config = _mlm_config(base, tmp_path / 'text.txt', tmp_path / 'text.txt',
                       **{'num_train_steps': 3, 'trainable': 'peft', 'compile_ahead': False})
  from adapter_tuning.training.trainer import train_and_evaluate
  metrics = train_and_evaluate(config, tmp_path / 'run')
  assert np.isfinite(metrics['eval/perplexity'])
  meta, weights = artifact.load(tmp_path / 'run' / 'adapter')
  assert 'head' not in weights and meta['trainable_rules'][0] == ['^head/', 'freeze']
  assert 'layer_0' in weights['encoder']
  out = capsys.readouterr()
  assert 'mlm head = loaded from the checkpoint (cls.predictions.*); frozen' in out.out + out.err


@pytest.mark.parametrize('overrides,needle', [
    ({'data.mlm_probability': 0.0}, 'data.mlm_probability must be in (0, 1), got 0.0'),
    ({'data.mlm_probability': 1.5}, 'data.mlm_probability must be in (0, 1)'),
    ({'data.source': 'tfds'}, 'data.task=mlm reads text files: set data.source=files'),
    ({'data.packing': True}, 'data.packing does not apply to data.task=mlm'),
])
def test_bad_mlm_configs_are_one_line(minilm_dir, overrides, needle):
  config = _mlm_config(minilm_dir, 'a.txt', 'b.txt', **overrides)
  with pytest.raises(UsageError) as e:
    validate(config)
  assert needle in str(e.value) and '\n' not in str(e.value)


def test_bad_mlm_config_at_the_command_line(tmp_path, minilm_dir):
  result = run_train('--config', 'configs/mlm_text.py', '--workdir', tmp_path / 'w',
                     f'--config.model.checkpoint={minilm_dir}',
                     f'--config.data.train_file={tmp_path / "missing.txt"}',
                     f'--config.data.eval_file={tmp_path / "missing.txt"}')
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'missing.txt not found' in last, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr


def test_batch_loss_is_the_mean_over_masked_tokens():
  """Token-weighted: a row with three masked tokens weighs three times one with one; filler
  rows (mask 0) and empty slots count for nothing."""
  import jax.numpy as jnp
  from adapter_tuning.training.steps import task_loss
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 3, 7)).astype(np.float32)
  batch = {'mlm_ids': np.array([[1, 2, 3], [4, 0, 0], [5, 6, 0]], np.int32),
           'mlm_weights': np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]], np.float32),
           'mask': np.array([1, 1, 0], np.float32), 'input_ids': np.zeros((3, 5), np.int32)}
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch['mlm_ids'][..., None], -1)[..., 0]
  expected = (nll[0].sum() + nll[1, 0]) / 4
  np.testing.assert_allclose(task_loss('mlm', jnp.asarray(logits), batch), expected, rtol=1e-6)
