"""What the fusion and stacking tests share: a tiny GLUE config on ../shared's TSVs, the MRPC
rows they serve, file digests, a padded batch for AdapterHub comparisons, and predict's
command line on a JSONL file."""

import hashlib
import json
import shutil

import flax.traverse_util as tu

import numpy as np

from adapter_tuning.interop import artifact
from adapter_tuning.serving.multi_adapter import MultiTaskModel
from conftest import GLUE_DIR
from helpers import predict_main, tiny_config

TOL = 1e-4  # AdapterHub's logits vs ours
ROWS = [{'text': f'the film {w}', 'text_pair': 'a great movie', 'task': 'glue/mrpc'}
        for w in ('was dull', 'is great', 'an actor', 'long and bland', 'very good')]


def glue_config(base, task, **overrides):
  return tiny_config(base, task, **{
      'data.source': 'glue_dir', 'data.data_dir': str(GLUE_DIR),
      'data.max_train_examples': 128, 'data.max_eval_examples': 32, **overrides})


def digest(directory):
  return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir())}


def rows_for(task):
  return [dict(r, task=task) for r in ROWS]


def padded_batch():
  """Four rows of lengths 12, 7, 3, 9 with padding and two segments each."""
  rng = np.random.default_rng(0)
  lengths = np.array([12, 7, 3, 9])
  mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(5, 90, (4, 12)).astype(np.int32)
  ids[:, 0] = 2
  ids = np.where(mask == 1, ids, 0).astype(np.int32)
  types = ((np.arange(12)[None] >= lengths[:, None] // 2) & (mask == 1)).astype(np.int32)
  return {'input_ids': ids, 'attention_mask': mask, 'token_type_ids': types}


def check_predict_cli(adapter, want, tmp_path):
  """predict's command line (its main() in this process; test_predict.py runs the real one)
  on ROWS gives `want`'s logits."""
  (tmp_path / 'in.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in ROWS))
  result = predict_main(f'--adapter={adapter}', f'--input={tmp_path / "in.jsonl"}',
                        f'--output={tmp_path / "out.jsonl"}')
  assert result.returncode == 0, result.stderr[-2000:]
  out = [json.loads(line) for line in (tmp_path / 'out.jsonl').read_text().splitlines()]
  for got, w in zip(out, want):
    np.testing.assert_allclose(got['logits'], w['logits'], atol=1e-6)


def borrowing_then_changed(borrower, method, field, source, tmp_path):
  """(moved, copy): `borrower` (a fusion or stack artifact) saved again as `moved`, its first
  borrowed adapter pointed at `copy` (an identical copy of `source`, which it still serves),
  then `copy`'s weights changed by 1e-3 so that its content hash no longer matches."""
  meta, params = artifact.load(borrower)
  copy = tmp_path / 'borrowed_copy'
  shutil.copytree(source, copy)
  meta['peft'][method][field][0]['path'] = str(copy)
  moved = tmp_path / f'{method}_moved'
  artifact.save(moved, params, meta)
  MultiTaskModel([moved])  # an identical copy is fine: the hash is of the content
  c_meta, c_params = artifact.load(copy)
  flat = tu.flatten_dict(c_params)
  key = next(k for k in flat if k[-1] == 'kernel' and '_adapter' in k[-3])
  flat[key] = flat[key] + 1e-3
  artifact.save(copy, tu.unflatten_dict(flat), c_meta)
  return moved, copy
