"""data.task=mlm: plain text for a language/domain adapter (MAD-X), masked by BERT's recipe.

Text: `data.train_file` / `data.eval_file`, each one file or several comma-separated: `.txt`
(one document or sentence per line, blank lines skipped) or the CSV/TSV/JSONL readers of
`text_files` (the `data.text_key` column). A line longer than `data.max_seq_length` tokens
is truncated, not split.

Masking (Devlin et al. 2019, and the original `create_pretraining_data.py`): of the
tokens that are not special ([CLS], [SEP], padding, [UNK], any added special token), a
`data.mlm_probability` share (round(p n), at least one) is chosen without replacement; of
those 80% become the mask token, 10% a random ordinary token and 10% stay unchanged, and
the loss is taken only on chosen positions. Masks are drawn on the host, per example, from
a generator seeded by (seed, epoch, example index), so they change every epoch, do not
depend on how the example was batched or on which process reads it, and a run resumed after
SIGKILL sees bit-identical batches. Evaluation masks are seeded by the example index alone
(not `seed`), so held-out perplexity is comparable across steps and across runs.

A batch of padded length L carries P = ceil(p L) prediction slots per row (`SLOT_KEYS`),
enough for any row: the model computes logits only there (see `heads.MaskedLM`).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import numpy as np

from adapter_tuning.errors import UsageError

SLOT_KEYS = ('mlm_positions', 'mlm_ids', 'mlm_weights')  # [B, P] each
_TAG = 0x6D6C6D  # 'mlm': keeps these streams apart from the other seeded generators
_TRAIN, _EVAL = 0, 1
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the chosen tokens; the rest stay unchanged


@dataclasses.dataclass(frozen=True)
class Masking:
  """BERT's masking for one tokenizer; `train`/`evaluate` turn a padded batch into an MLM one."""

  probability: float
  mask_id: int
  special_ids: np.ndarray  # never chosen
  random_ids: np.ndarray  # the ordinary vocabulary, for the 10% random replacements

  def num_slots(self, length: int) -> int:
    """Prediction slots of a row padded to `length`: at least any row's chosen count."""
    return max(1, math.ceil(self.probability * length))

  def draw(self, ids_T: np.ndarray, rng: np.random.Generator):
    """(masked ids, chosen positions (sorted), their original ids) for one unpadded row."""
    candidates = np.flatnonzero(~np.isin(ids_T, self.special_ids))
    count = 0 if not len(candidates) else max(1, int(np.floor(
        self.probability * len(candidates) + 0.5)))
    positions = np.sort(rng.choice(candidates, count, replace=False))
    draws = rng.random(count)
    masked = ids_T.copy()
    masked[positions[draws < MASK_SHARE]] = self.mask_id
    random = (draws >= MASK_SHARE) & (draws < MASK_SHARE + RANDOM_SHARE)
    masked[positions[random]] = self.random_ids[rng.integers(len(self.random_ids),
                                                             size=int(random.sum()))]
    return masked, positions, ids_T[positions]

  def train(self, batch: dict, seed: int, epoch: int) -> dict:
    """A training batch whose `labels` are example indices (`load_mlm`) -> MLM batch."""
    batch = dict(batch)
    index = batch.pop('labels')
    return self._apply(batch, [(_TAG, _TRAIN, seed, epoch, int(i)) for i in index])

  def evaluate(self, batch: dict, index) -> dict:
    """An eval batch (`index`: example indices, -1 for filler rows) -> MLM batch with the
    split's fixed masks (filler rows copy their batch's first row, and so its masks)."""
    index = np.where(np.asarray(index) < 0, index[0], index)
    return self._apply(dict(batch), [(_TAG, _EVAL, int(i)) for i in index])

  def _apply(self, batch: dict, keys) -> dict:
    ids = batch['input_ids']
    rows, length = ids.shape
    slots = self.num_slots(length)
    masked = ids.copy()
    out = {'mlm_positions': np.zeros((rows, slots), np.int32),
           'mlm_ids': np.zeros((rows, slots), np.int32),
           'mlm_weights': np.zeros((rows, slots), np.float32)}
    for r, key in enumerate(keys):
      n = int(batch['attention_mask'][r].sum())
      row, positions, targets = self.draw(ids[r, :n], np.random.default_rng(key))
      masked[r, :n] = row
      out['mlm_positions'][r, :len(positions)] = positions
      out['mlm_ids'][r, :len(positions)] = targets
      out['mlm_weights'][r, :len(positions)] = 1.0
    return {**batch, 'input_ids': masked, **out}

  def spec(self, batch_spec: dict, length: int) -> dict:
    """An abstract batch (ShapeDtypeStructs) at padded `length` with its slots resized: what
    `precompile.with_length` cannot know."""
    import jax
    resize = lambda v: jax.ShapeDtypeStruct((v.shape[0], self.num_slots(length)), v.dtype,
                                            sharding=v.sharding)
    return {k: resize(v) if k in SLOT_KEYS else v for k, v in batch_spec.items()}


def masking_for(tokenizer, probability: float) -> Masking:
  """The family's mask token, the tokenizer's special ids, and the ordinary vocabulary."""
  from adapter_tuning.models.mlm_head import layouts
  token = layouts(tokenizer.family)[0].mask_token
  mask_id = tokenizer.backend.token_to_id(token)
  if mask_id is None:
    raise UsageError(f'the tokenizer has no mask token {token!r}; data.task=mlm needs the '
                     f'tokenizer saved with the {tokenizer.family} checkpoint')
  added = tokenizer.backend.get_added_tokens_decoder()
  special = {tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, mask_id}
  special |= {i for i, t in added.items() if t.special}
  special_ids = np.asarray(sorted(special), np.int32)
  random_ids = np.setdiff1d(np.arange(tokenizer.vocab_size, dtype=np.int32), special_ids)
  return Masking(float(probability), int(mask_id), special_ids, random_ids)


def read_texts(spec: str, text_key: str) -> list[str]:
  """The non-blank texts of one or several comma-separated files (.txt: one per line)."""
  from adapter_tuning.data import text_files
  texts = []
  for name in [s.strip() for s in spec.split(',') if s.strip()]:
    path = pathlib.Path(name).expanduser()
    if not path.is_file():
      raise UsageError(f'{path} not found; data.task=mlm reads .txt (one text per line), '
                       'CSV, TSV or JSONL files')
    if path.suffix.lower() == '.txt':
      with open(path, encoding='utf-8-sig') as f:
        texts.extend(line.strip() for line in f if line.strip())
      continue
    for n, row in text_files.read_rows(path):
      if text_key not in row or not isinstance(row[text_key], str):
        raise UsageError(f'{path}:{n}: no text column {text_key!r}; set data.text_key')
      if row[text_key].strip():
        texts.append(row[text_key])
  return texts


def _split(name: str, spec: str, config, tokenizer, limit: int, masking: Masking):
  """One tokenised split; texts without a maskable token (only [UNK]s) are left out."""
  from adapter_tuning.data.tasks import Split
  texts = read_texts(spec, config.data.text_key)
  texts = texts[:limit] if limit > 0 else texts
  ids, types = tokenizer.tokenize(texts, None, config.data.max_seq_length) if texts else ([], [])
  keep = [i for i, x in enumerate(ids) if not np.all(np.isin(x, masking.special_ids))]
  if not keep:
    raise UsageError(f'split {name!r} ({spec}) has no text to mask; check the file(s)')
  examples = [{'text': texts[i], 'text_pair': None, 'label': None, 'idx': j}
              for j, i in enumerate(keep)]
  split = Split(name, [ids[i] for i in keep], [types[i] for i in keep],
                {'labels': np.arange(len(keep), dtype=np.int32)}, examples)
  return split, len(texts) - len(keep)


def load_mlm(config, tokenizer, with_train: bool = True):
  """TaskData for data.task=mlm: `labels` are example indices (what masks are seeded by)."""
  from adapter_tuning.data.tasks import TaskData
  data = config.data
  if data.source != 'files':
    raise UsageError(f'data.task=mlm reads text files (data.source=files), not '
                     f'{data.source!r}')
  for key in ('train_file', 'eval_file'):
    if not getattr(data, key) and (with_train or key == 'eval_file'):
      raise UsageError(f'data.task=mlm needs data.{key} (.txt, one text per line; or CSV, '
                       'TSV, JSONL with data.text_key)')
  masking = masking_for(tokenizer, data.mlm_probability)
  report, train = {}, None
  if with_train:
    train, skipped = _split('train', data.train_file, config, tokenizer,
                            data.max_train_examples, masking)
    report['mlm train texts without maskable tokens (left out)'] = skipped
  evals, skipped = _split('validation', data.eval_file, config, tokenizer,
                          data.max_eval_examples, masking)
  report['mlm masking'] = (f'{data.mlm_probability:g} of non-special tokens, 80% '
                           f'{tokenizer.backend.id_to_token(masking.mask_id)} / 10% random / '
                           '10% kept; eval masks fixed')
  name = data.name or pathlib.Path(
      (data.train_file or data.eval_file).split(',')[0]).resolve().parent.name
  return TaskData(f'mlm/{name}', 'mlm', (), ('perplexity', 'loss', 'accuracy'), train,
                  {'validation': evals}, report, masking=masking)
