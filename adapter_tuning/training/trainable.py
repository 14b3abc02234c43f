"""What trains, declared once: ordered (regex, 'train' | 'freeze') rules over param paths.

Paths are '/'-joined, e.g. 'encoder/layer_3/ffn_adapter/down/kernel' or 'head/kernel'.
The first rule that matches (re.search) decides; a parameter that no rule matches is an
error, so a typo in a rule cannot silently freeze or train the wrong thing. The same
rules drive the optimizer, the checkpoint contents, the parameter table and the export.
"""

from __future__ import annotations

import re
from typing import Sequence

import flax.traverse_util as tu
import numpy as np

from adapter_tuning import peft
from adapter_tuning.errors import UsageError

Rules = tuple[tuple[str, str], ...]



def _method_params() -> Rules:
  return tuple((pattern, 'train') for pattern in peft.param_patterns())


def adapters_preset() -> Rules:
  """The paper's recipe: every PEFT method's params, every LayerNorm, the head."""
  return (*_method_params(), (r'layer_norm/', 'train'), (r'^head/', 'train'), (r'.*', 'freeze'))


def peft_preset() -> Rules:
  """AdapterHub's and peft's recipe: every PEFT method's params and the head; LayerNorms frozen."""
  return (*_method_params(), (r'^head/', 'train'), (r'.*', 'freeze'))


ADAPTERS: Rules = adapters_preset()
# BitFit (Ben Zaken et al. 2022): every bias term (LayerNorm biases too) and the head.
BITFIT: Rules = ((r'/bias$', 'train'), (r'^head/', 'train'), (r'.*', 'freeze'))
FULL: Rules = ((r'.*', 'train'),)
HEAD: Rules = ((r'^head/', 'train'), (r'.*', 'freeze'))


def top_k(k: int, num_layers: int) -> Rules:
  """Fine-tune the top k transformer layers (and the head): the paper's baseline."""
  if not 0 <= k <= num_layers:
    raise UsageError(f'trainable=top:{k} but the model has {num_layers} layers; use 0..{num_layers}')
  layers = '|'.join(str(i) for i in range(num_layers - k, num_layers))
  rules: list[tuple[str, str]] = [(r'^head/', 'train')]
  if k:
    rules.append((rf'^encoder/layer_({layers})/', 'train'))
  rules.append((r'.*', 'freeze'))
  return tuple(rules)


# Presets that adapt a frozen base with a few new parameters: a head the base was pretrained
# with (the masked-LM head) belongs to that base under them.
PEFT_PRESETS = ('adapters', 'peft', 'bitfit')


def with_pretrained_head(spec, rules: Rules) -> Rules:
  """`rules` with the head frozen first, under the PEFT presets, for a head loaded from the
  checkpoint (the masked-LM head of a `*ForMaskedLM` save).

  MAD-X trains language adapters with the pretrained LM head frozen: the head already maps
  the base's last hidden states to tokens, and the adapter is meant to move those states
  towards the new language or domain, not to re-fit the head (a re-fitted head would be lost
  when the adapter is stacked under a task head). A head the checkpoint lacks (e.g.
  sentence-transformers saves) is new and random, so it must train: then the rules are left
  as they are (every preset's `^head/` rule trains it). `full`, `head`, `top:K` and explicit
  rules decide for themselves."""
  if isinstance(spec, str) and spec in PEFT_PRESETS:
    return (('^head/', 'freeze'),) + tuple(rules)
  return tuple(rules)


def resolve(spec, num_layers: int) -> Rules:
  """'adapters' | 'peft' | 'bitfit' | 'full' | 'head' | 'top:K' | a list of (regex, mode).

  Every preset first freezes what a method loads rather than learns (`peft.frozen_patterns`:
  AdapterFusion's fused adapters); explicit rules decide for themselves (first match)."""
  if isinstance(spec, str) and '=' not in spec:
    return tuple((p, 'freeze') for p in peft.frozen_patterns()) + _resolve(spec, num_layers)
  return _resolve(spec, num_layers)


def _resolve(spec, num_layers: int) -> Rules:
  if isinstance(spec, str):
    if spec == 'adapters':
      return adapters_preset()
    if spec == 'peft':
      return peft_preset()
    if spec == 'bitfit':
      return BITFIT
    if spec == 'full':
      return FULL
    if spec == 'head':
      return HEAD
    if '=' in spec:  # the command-line spelling of rules: 'REGEX=train;REGEX=freeze;...'
      return resolve([tuple(item.rsplit('=', 1)) for item in spec.split(';') if item.strip()],
                     num_layers)
    if spec.startswith('top:'):
      try:
        k = int(spec[4:])
      except ValueError:
        raise UsageError(f'trainable={spec!r}: K in top:K must be an integer') from None
      return top_k(k, num_layers)
    raise UsageError(f'unknown trainable preset {spec!r}; use adapters, peft, bitfit, full, head, '
                     "top:K, or rules: 'REGEX=train;REGEX=freeze;...'")
  rules = []
  for rule in spec:
    if not isinstance(rule, Sequence) or len(rule) != 2 or rule[1] not in ('train', 'freeze'):
      raise UsageError(f'bad trainable rule {rule!r}; each rule is (regex, "train"|"freeze"), '
                       "on the command line REGEX=train or REGEX=freeze")
    try:
      re.compile(rule[0])
    except re.error as e:
      raise UsageError(f'bad regex {rule[0]!r} in trainable rules: {e}') from None
    rules.append((str(rule[0]), str(rule[1])))
  if not rules:
    raise UsageError('trainable rules are empty; give at least one (regex, train|freeze)')
  return tuple(rules)


def path_str(path: tuple) -> str:
  return '/'.join(str(p) for p in path)


def decide(rules: Rules, path: str) -> bool:
  for pattern, action in rules:
    if re.search(pattern, path):
      return action == 'train'
  raise UsageError(f'no trainable rule matches parameter {path!r}; end the rules with '
                   "('.*', 'freeze') or ('.*', 'train')")


def mask(params: dict, rules: Rules) -> dict:
  """A pytree of bools (True = trains) with the structure of params."""
  flat = tu.flatten_dict(params)
  return tu.unflatten_dict({k: decide(rules, path_str(k)) for k in flat})


def split(params: dict, rules: Rules) -> tuple[dict, dict]:
  """(trainable, frozen) nested dicts; each holds only its own leaves."""
  flat = tu.flatten_dict(params)
  train = {k: v for k, v in flat.items() if decide(rules, path_str(k))}
  frozen = {k: v for k, v in flat.items() if k not in train}
  if not train:
    raise UsageError('the trainable rules select no parameter; check `trainable`')
  if rules[-len(BITFIT):] == BITFIT and all(k[0] == 'head' for k in train):
    raise UsageError('trainable=bitfit finds no bias in this encoder (ModernBERT checkpoints '
                     'have none unless attention_bias/mlp_bias/norm_bias); use another method')
  return tu.unflatten_dict(train), tu.unflatten_dict(frozen)


def merge(trainable: dict, frozen: dict) -> dict:
  flat = tu.flatten_dict(frozen)
  flat.update(tu.flatten_dict(trainable))
  return tu.unflatten_dict(flat)


def summary(params: dict, rules: Rules) -> dict[str, int | float]:
  """Counts: total, base (non-adapter, non-head), adapter, head and trainable parameters."""
  counts = {'total': 0, 'adapter': 0, 'head': 0, 'trainable': 0}
  for k, v in tu.flatten_dict(params).items():
    n = int(np.prod(np.shape(v)))
    p = path_str(k)
    counts['total'] += n
    counts['adapter'] += n * peft.is_method_param(k)
    counts['head'] += n * p.startswith('head/')
    counts['trainable'] += n * decide(rules, p)
  counts['base'] = counts['total'] - counts['adapter'] - counts['head']
  counts['trainable_pct_of_base'] = 100.0 * counts['trainable'] / max(counts['base'], 1)
  return counts


def format_summary(counts: dict) -> str:
  rows = [('base model', counts['base']), ('PEFT modules', counts['adapter']),
          ('task head', counts['head']), ('total', counts['total']),
          ('trainable', counts['trainable'])]
  lines = [f'  {name:<12} {n:>14,d}' for name, n in rows]
  lines.append(f'  trainable = {counts["trainable_pct_of_base"]:.2f}% of the base model '
               f'({100.0 * counts["trainable"] / max(counts["total"], 1):.2f}% of all params)')
  return 'parameters:\n' + '\n'.join(lines)
