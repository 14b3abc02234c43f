"""SQuAD v1.1 exact match and F1, as the official evaluation script defines them.

Published SQuAD numbers (the paper's 90.4 F1 for adapters) are computed by that script, so
any deviation here, however sensible (e.g. unicode punctuation), would make our scores
incomparable. The definitions: lower-case; drop every character in `string.punctuation`;
drop the whole words a/an/the; collapse whitespace. EM compares the normalised strings; F1
is the harmonic mean of token precision and recall with multiset (Counter) overlap. Both
take the maximum over a question's ground truths and are averaged over all questions as
percentages; a question without a prediction scores 0.
"""

from __future__ import annotations

import collections
import re
import string

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r'\b(a|an|the)\b')


def normalize_answer(text: str) -> str:
  """Lower-case, remove punctuation, remove articles, collapse whitespace (in that order)."""
  text = ''.join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  text = _ARTICLES.sub(' ', text)
  return ' '.join(text.split())


def _exact_match_one(prediction: str, ground_truth: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def _f1_one(prediction: str, ground_truth: str) -> float:
  predicted = normalize_answer(prediction).split()
  gold = normalize_answer(ground_truth).split()
  same = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
  if same == 0:
    return 0.0
  precision = same / len(predicted)
  recall = same / len(gold)
  return 2 * precision * recall / (precision + recall)


def _max_over(metric, prediction, ground_truths) -> float:
  if isinstance(ground_truths, str):
    ground_truths = [ground_truths]
  if not ground_truths:
    raise ValueError('no ground truths to compare with; every scored question needs at least '
                     'one gold answer')
  return max(metric(prediction, g) for g in ground_truths)


def exact_match(prediction: str, ground_truths) -> float:
  """1.0 if the normalised prediction equals any normalised ground truth, else 0.0."""
  return _max_over(_exact_match_one, prediction, ground_truths)


def f1(prediction: str, ground_truths) -> float:
  """Best token-level F1 (0..1) of the prediction against any ground truth."""
  return _max_over(_f1_one, prediction, ground_truths)


def evaluate(dataset_examples, predictions: dict) -> dict[str, float]:
  """{'exact_match', 'f1'} in percent over all examples; unanswered questions score 0.

  `dataset_examples` are SQuAD examples (`id`, `answers: {'text': [...]}`); `predictions`
  maps question id to answer text.
  """
  total = em = f1_sum = 0.0
  for ex in dataset_examples:
    total += 1
    if ex['id'] not in predictions:
      continue
    golds = ex['answers']['text']
    if not golds:
      raise ValueError(f'question {ex["id"]!r} has no gold answers; drop it before scoring '
                       '(data.squad.check_answers does)')
    em += exact_match(predictions[ex['id']], golds)
    f1_sum += f1(predictions[ex['id']], golds)
  if not total:
    raise ValueError('no examples to evaluate; pass the evaluation split\'s examples')
  return {'exact_match': 100.0 * em / total, 'f1': 100.0 * f1_sum / total}
