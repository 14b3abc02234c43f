"""SQuAD v1.1: reading, splitting by article, context windows, and span post-processing.

The model sees fixed-length windows ([CLS] question [SEP] context-slice [SEP]); answers are
character spans of the original context. Everything here exists to move between the two
without losing text: contexts are tokenised once with character offsets, windows keep the
offsets of their context tokens, and predictions are cut out of the original context string
(so the scorer sees the author's characters, not detokenised WordPieces).

Examples are plain dicts in the TFDS / Hugging Face layout:
`{'id', 'title', 'context', 'question', 'answers': {'text': [...], 'answer_start': [...]}}`.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from adapter_tuning.errors import UsageError

TFDS_NAME = 'squad/v1.1'
_OFFLINE_HINT = ('offline, use data.source=squad_json with data.train_file/data.eval_file '
                 'set to SQuAD v1.1 JSON files')
_MAX_FAILURES_KEPT = 10


# ----------------------------------------------------------------------------- reading


def read_squad_json(path, is_training: bool = False) -> tuple[list[dict], dict]:
  """Reads a SQuAD v1.1 JSON file into examples plus counts worth reporting.

  Structural problems are errors (one line, naming the file and the fix); an answer whose
  `answer_start` does not point at its text is not: it is counted and, for training, skipped
  (see `check_answers`), because one bad span should not cost a whole file.
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise UsageError(f'SQuAD file {path} does not exist; set data.train_file/data.eval_file '
                     'to a SQuAD v1.1 JSON file (e.g. dev-v1.1.json)')
  try:
    obj = json.loads(path.read_text(encoding='utf-8'))
  except json.JSONDecodeError as e:
    raise UsageError(f'{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; '
                     'fix the file or download it again') from None
  except UnicodeDecodeError as e:
    raise UsageError(f'{path} is not UTF-8 ({e.reason} at byte {e.start}); '
                     'save it as UTF-8 JSON') from None
  if not isinstance(obj, dict) or not isinstance(obj.get('data'), list):
    raise UsageError(f'{path}: top level must be {{"data": [articles]}} (SQuAD v1.1 layout: '
                     'article -> paragraphs -> qas); convert the file to that layout')
  return check_answers(_flatten(obj['data'], path), is_training=is_training, source=str(path))


def _flatten(articles, path) -> list[dict]:
  """Articles -> one example per question, validating the structure on the way."""
  examples, seen = [], set()

  def fail(where, what, fix):
    raise UsageError(f'{path}: {where}: {what}; {fix}')

  for i, article in enumerate(articles):
    if not isinstance(article, dict) or not isinstance(article.get('paragraphs'), list):
      fail(f'data[{i}]', 'article has no "paragraphs" list', 'give each article a list of '
           'paragraphs with "context" and "qas"')
    title = article.get('title')
    title = title if isinstance(title, str) and title else f'article-{i}'
    for j, paragraph in enumerate(article['paragraphs']):
      where = f'data[{i}].paragraphs[{j}]'
      if not isinstance(paragraph, dict):
        fail(where, 'paragraph is not an object', 'use {"context": ..., "qas": [...]}')
      qas = paragraph.get('qas', [])
      if not isinstance(qas, list):
        fail(where, '"qas" is not a list', 'use a list of questions')
      context = paragraph.get('context')
      if qas and (not isinstance(context, str) or not context.strip()):
        first = qas[0].get('id') if isinstance(qas[0], dict) else None
        fail(where, f'question {first!r} has no context (missing or empty "context")',
             'every paragraph with questions needs its context text')
      for k, qa in enumerate(qas):
        qwhere = f'{where}.qas[{k}]'
        if not isinstance(qa, dict):
          fail(qwhere, 'question is not an object', 'use {"id", "question", "answers"}')
        qid, question = qa.get('id'), qa.get('question')
        if not isinstance(qid, str) or not qid:
          fail(qwhere, 'question has no "id"', 'give every question a unique string id')
        if not isinstance(question, str) or not question.strip():
          fail(qwhere, f'question {qid!r} has no "question" text', 'add the question text')
        if qid in seen:
          fail(qwhere, f'duplicate question id {qid!r}', 'ids must be unique (predictions '
               'are keyed by id)')
        seen.add(qid)
        examples.append({'id': qid, 'title': title, 'context': context, 'question': question,
                         'answers': _answers(qa.get('answers', []), qwhere, qid, fail)})
  return examples


def _answers(answers, where, qid, fail) -> dict:
  if not isinstance(answers, list):
    fail(where, f'"answers" of question {qid!r} is not a list', 'use [{"text", "answer_start"}]')
  texts, starts = [], []
  for a in answers:
    if (not isinstance(a, dict) or not isinstance(a.get('text'), str)
        or isinstance(a.get('answer_start'), bool) or not isinstance(a.get('answer_start'), int)):
      fail(where, f'an answer of question {qid!r} lacks a string "text" or an integer '
           '"answer_start"', 'give each answer both fields')
    texts.append(a['text'])
    starts.append(a['answer_start'])
  return {'text': texts, 'answer_start': starts}


def span_matches(context: str, text: str, start: int) -> bool:
  """Whether `answer_start` points at the answer text: context[start:start+len(text)] == text."""
  return bool(text) and 0 <= start and context[start:start + len(text)] == text


def check_answers(examples, *, is_training: bool, source: str = 'examples'):
  """Counts (training: drops) answers whose `answer_start` does not match their text.

  Training needs a correct character span, so mismatched answers are removed and a question
  left without any answer is dropped. Evaluation only scores texts, so every gold text is
  kept; only questions with no answer at all are dropped (they cannot be scored).

  Returns (examples, stats) with stats `questions_read`, `answers_read`, `answers_mismatched`,
  `questions_without_valid_answer` (facts about the data) and `answers_skipped`,
  `questions_dropped` (what was removed), plus `source`.
  """
  stats = {'source': source, 'questions_read': len(examples), 'answers_read': 0,
           'answers_mismatched': 0, 'questions_without_valid_answer': 0,
           'answers_skipped': 0, 'questions_dropped': 0}
  kept = []
  for ex in examples:
    texts, starts = ex['answers']['text'], ex['answers']['answer_start']
    valid = [span_matches(ex['context'], t, s) for t, s in zip(texts, starts)]
    stats['answers_read'] += len(texts)
    stats['answers_mismatched'] += valid.count(False)
    stats['questions_without_valid_answer'] += not any(valid)
    if is_training:
      stats['answers_skipped'] += valid.count(False)
      if not any(valid):
        stats['questions_dropped'] += 1
        continue
      ex = dict(ex, answers={'text': [t for t, v in zip(texts, valid) if v],
                             'answer_start': [s for s, v in zip(starts, valid) if v]})
    elif not texts:
      stats['questions_dropped'] += 1
      continue
    kept.append(ex)
  return kept, stats


def read_squad_tfds(split: str, data_dir=None, is_training: bool = False):
  """Reads `squad/v1.1` from TFDS (`train` / `validation`) as examples plus stats.

  Uses `tfds.data_source` (random access, no TensorFlow needed). Any failure to obtain the
  data (no network, not prepared, bad split name) becomes one line pointing at the offline
  JSON path, since that is the usual fix.
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  try:
    source = tfds.data_source(TFDS_NAME, split=split, data_dir=data_dir)
    records = [source[i] for i in range(len(source))]
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [''])[0][:200]
    raise UsageError(f'could not load TFDS {TFDS_NAME} split {split!r} ({type(e).__name__}: '
                     f'{first}); {_OFFLINE_HINT}') from None
  examples = [_decode_record(r) for r in records]
  return check_answers(examples, is_training=is_training, source=f'tfds:{TFDS_NAME}:{split}')


def _decode_record(record) -> dict:
  answers = record['answers']
  return {'id': _str(record['id']), 'title': _str(record['title']),
          'context': _str(record['context']), 'question': _str(record['question']),
          'answers': {'text': [_str(t) for t in answers['text']],
                      'answer_start': [int(s) for s in answers['answer_start']]}}


def _str(value) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def split_by_article(examples, eval_fraction: float, seed: int):
  """Splits examples into (train, eval) by article title, so no context leaks across.

  Questions on one article share paragraphs; splitting by question would put the same
  contexts (and often the same answers) on both sides. Order within each side is kept.
  """
  if not 0 < eval_fraction < 1:
    raise UsageError(f'eval_fraction={eval_fraction} must be between 0 and 1 (exclusive)')
  titles = list(dict.fromkeys(e['title'] for e in examples))
  if len(titles) < 2:
    raise UsageError(f'cannot split {len(titles)} article(s) into train and eval; '
                     'use a file with at least two articles or separate train/eval files')
  n_eval = min(len(titles) - 1, max(1, round(eval_fraction * len(titles))))
  order = np.random.default_rng(seed).permutation(len(titles))
  eval_titles = {titles[i] for i in order[:n_eval]}
  train = [e for e in examples if e['title'] not in eval_titles]
  evals = [e for e in examples if e['title'] in eval_titles]
  return train, evals


# ----------------------------------------------------------------------------- windows


def _context_position(tokenizer) -> int:
  """Where the second segment starts when the first is one token long.

  Asked of `build_pair` itself (with sentinel ids) so any special-token layout works
  ([CLS] a [SEP] b [SEP] -> 2; <s> a </s></s> b </s> -> 3).
  """
  ids, _ = tokenizer.build_pair([-1], [-2, -2])
  ids = [int(i) for i in ids]
  pos = ids.index(-2)
  if len(ids) != 3 + tokenizer.num_special_tokens_pair or ids[pos + 1] != -2:
    raise UsageError('tokenizer.build_pair does not keep the second segment contiguous or '
                     'disagrees with num_special_tokens_pair; fix the tokenizer wrapper')
  return pos - 1


def _windows(n_tokens: int, max_tokens: int, stride: int) -> list[tuple[int, int]]:
  """(start, length) of context slices: starts advance by `stride`, the last reaches the end."""
  spans, start = [], 0
  while True:
    length = min(max_tokens, n_tokens - start)
    spans.append((start, length))
    if start + length >= n_tokens:
      return spans
    start += min(length, stride)


def char_to_token_span(offsets: np.ndarray, start: int, end: int):
  """First and last token overlapping characters [start, end), or None if none does."""
  hit = np.nonzero((offsets[:, 1] > start) & (offsets[:, 0] < end))[0]
  return (int(hit[0]), int(hit[-1])) if hit.size else None


def make_features(examples, tokenizer, max_seq_length: int = 384, doc_stride: int = 128,
                  max_query_length: int = 64, is_training: bool = False):
  """Tokenises questions and contexts once and cuts each context into overlapping windows.

  `tokenizer` provides `backend` (a `tokenizers.Tokenizer`, padding/truncation off),
  `build_pair(ids_a, ids_b)`, `num_special_tokens_pair` and `pad_id`.

  Returns (features, report). features: ragged int32 `input_ids`/`token_type_ids` and
  `token_offsets` ([L, 2] char offsets into the context, -1 outside it) per window;
  `example_index`, `context_start` (position of the window's first context token) and
  `context_length` as int32 arrays; for training, `start_position`/`end_position` of the
  first valid answer, or 0/0 (the [CLS] position) when it is not wholly inside the window.
  report: how many gold answers fit in a window and how many of those round-trip exactly
  (context[offsets[start][0]:offsets[end][1]] == text), with a few failures to look at.
  """
  n_special = tokenizer.num_special_tokens_pair
  if max_query_length < 1 or doc_stride < 1:
    raise UsageError('data.max_query_length and data.doc_stride must be at least 1')
  if max_seq_length - max_query_length - n_special < 1:
    raise UsageError(f'max_seq_length={max_seq_length} leaves no room for context after '
                     f'{max_query_length} question tokens and {n_special} special tokens; '
                     'raise data.max_seq_length or lower data.max_query_length')
  backend = tokenizer.backend
  lead = _context_position(tokenizer)
  questions = backend.encode_batch([ex['question'] for ex in examples], add_special_tokens=False)
  unique = list(dict.fromkeys(ex['context'] for ex in examples))
  encoded = dict(zip(unique, backend.encode_batch(unique, add_special_tokens=False)))

  features = {k: [] for k in ('input_ids', 'token_type_ids', 'token_offsets', 'example_index',
                              'context_start', 'context_length', 'start_position',
                              'end_position')}
  report = {'examples': len(examples), 'features': 0, 'answers_checked': 0,
            'answers_not_located': 0, 'answers_in_a_window': 0, 'answers_roundtrip': 0,
            'roundtrip_failures': []}
  for ex_i, ex in enumerate(examples):
    q_ids = questions[ex_i].ids[:max_query_length]
    enc = encoded[ex['context']]
    c_ids = enc.ids
    c_off = np.asarray(enc.offsets, np.int32).reshape(-1, 2)
    windows = _windows(len(c_ids), max_seq_length - len(q_ids) - n_special, doc_stride)
    spans = _answer_spans(ex, c_off, windows, report)
    train_span = spans[0] if spans else None
    start = lead + len(q_ids)
    for w_start, w_len in windows:
      ids, types = tokenizer.build_pair(q_ids, c_ids[w_start:w_start + w_len])
      offsets = np.full((len(ids), 2), -1, np.int32)
      offsets[start:start + w_len] = c_off[w_start:w_start + w_len]
      features['input_ids'].append(np.asarray(ids, np.int32))
      features['token_type_ids'].append(np.asarray(types, np.int32))
      features['token_offsets'].append(offsets)
      features['example_index'].append(ex_i)
      features['context_start'].append(start)
      features['context_length'].append(w_len)
      s = e = 0
      if train_span and w_start <= train_span[0] and train_span[1] < w_start + w_len:
        s, e = start + train_span[0] - w_start, start + train_span[1] - w_start
      features['start_position'].append(s)
      features['end_position'].append(e)

  for key in ('example_index', 'context_start', 'context_length', 'start_position',
              'end_position'):
    features[key] = np.asarray(features[key], np.int32)
  if is_training:
    report['windows_without_answer'] = int(np.sum(features['start_position'] == 0))
  else:
    del features['start_position'], features['end_position']
  report['features'] = len(features['input_ids'])
  report['roundtrip_fraction'] = (report['answers_roundtrip'] /
                                  max(report['answers_in_a_window'], 1))
  return features, report


def _answer_spans(ex, c_off, windows, report) -> list[tuple[int, int]]:
  """Token spans of the example's valid answers; updates the round-trip counts."""
  spans = []
  context = ex['context']
  for text, char_start in zip(ex['answers']['text'], ex['answers']['answer_start']):
    if not span_matches(context, text, char_start):
      continue
    report['answers_checked'] += 1
    span = char_to_token_span(c_off, char_start, char_start + len(text))
    if span is None:
      report['answers_not_located'] += 1
      continue
    spans.append(span)
    if not any(w <= span[0] and span[1] < w + n for w, n in windows):
      continue
    report['answers_in_a_window'] += 1
    recovered = context[c_off[span[0], 0]:c_off[span[1], 1]]
    if recovered == text:
      report['answers_roundtrip'] += 1
    elif len(report['roundtrip_failures']) < _MAX_FAILURES_KEPT:
      report['roundtrip_failures'].append((ex['id'], text, recovered))
  return spans


# ----------------------------------------------------------------------------- predictions


def postprocess(examples, features, start_logits, end_logits, n_best: int = 20,
                max_answer_length: int = 30) -> dict[str, str]:
  """Best answer text per question id from per-window start/end logits.

  In every window, pairs of the `n_best` highest start and end logits over context
  positions are scored by start + end logit (kept if start <= end and the span is at most
  `max_answer_length` tokens); the best pair over all of a question's windows wins, and its
  text is cut from the original context by character offsets. Logit rows may be longer
  than their window (padding to a bucket length); the extra positions are ignored.
  A question with no admissible span gets ''.
  """
  n_features = len(features['example_index'])
  if len(start_logits) != n_features or len(end_logits) != n_features:
    raise ValueError(f'{n_features} features but {len(start_logits)} start / '
                     f'{len(end_logits)} end logit rows; pass one row per feature')
  best = {}  # example index -> (score, feature, start, end)
  for f in range(n_features):
    offsets = features['token_offsets'][f]
    length = len(offsets)
    start_row = np.asarray(start_logits[f], np.float32)[:length]
    end_row = np.asarray(end_logits[f], np.float32)[:length]
    if len(start_row) < length or len(end_row) < length:
      raise ValueError(f'feature {f} has {length} tokens but only {len(start_row)} start / '
                       f'{len(end_row)} end logits')
    context = np.nonzero(offsets[:, 0] >= 0)[0]
    if not context.size:
      continue
    k = min(n_best, context.size)
    starts = context[np.argsort(-start_row[context], kind='stable')[:k]]
    ends = context[np.argsort(-end_row[context], kind='stable')[:k]]
    width = ends[None, :] - starts[:, None] + 1
    scores = np.where((width >= 1) & (width <= max_answer_length),
                      start_row[starts][:, None] + end_row[ends][None, :], -np.inf)
    i, j = np.unravel_index(np.argmax(scores), scores.shape)
    if not np.isfinite(scores[i, j]):
      continue
    ex_i = int(features['example_index'][f])
    if ex_i not in best or scores[i, j] > best[ex_i][0]:
      best[ex_i] = (float(scores[i, j]), f, int(starts[i]), int(ends[j]))
  answers = {}
  for ex_i, ex in enumerate(examples):
    if ex_i not in best:
      answers[ex['id']] = ''
      continue
    _, f, s, e = best[ex_i]
    offsets = features['token_offsets'][f]
    answers[ex['id']] = ex['context'][offsets[s, 0]:offsets[e, 1]]
  return answers
