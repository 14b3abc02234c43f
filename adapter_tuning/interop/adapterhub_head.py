"""Our prediction heads <-> AdapterHub's (`adapters` 1.3) prediction heads, both ways.

The head side of `interop/adapterhub.py`. Facts about AdapterHub 1.3.0, checked against its
source (`heads/base.py`, `models/*/adapter_model.py`):

* `ClassificationHead` with `layers=1` is [Dropout, Linear(d, n)] (keys `heads.{name}.1.*`)
  on the pooler output if `use_pooler=True`, else on the [CLS] state -- our head under
  pooling 'pooler' or 'cls'. With `layers=2` and `use_pooler=False` it is [Dropout,
  Linear(d, d), act, Dropout, Linear(d, n)] on the [CLS] state: a pooler of its own
  (`heads.{name}.1`, with `activation_function`) plus our head (`heads.{name}.4`); that maps
  to an artifact that carries `encoder/pooler/*`. `num_labels=1` is regression.
  `QuestionAnsweringHead` with `layers=1` is Linear(d, 2) on every token: our span head.
* Only some *AdapterModels hand their heads a pooler output (`AdapterHubModules.
  pooled_output`): BERT's, RoBERTa's and XLM-R's (the base model's tanh pooler).
  DistilBERT's and ELECTRA's hand none (`use_pooler=True` fails there) and DeBERTa-v2's
  hands the whole sequence, so on those our pooler (DistilBERT's ReLU `pre_classifier`,
  ELECTRA's GELU `classifier.dense`, DeBERTa's `ContextPooler`) can only travel as the first
  layer of a 2-layer head, and only when the artifact carries it (a trained pooler).
* The 2-layer head's activation is the base's pooler activation: config.json's where the
  family reads one (DeBERTa's `pooler_hidden_act`), else the family's.
"""

from __future__ import annotations

import re

import numpy as np

from adapter_tuning.errors import UsageError
from adapter_tuning.models.families import family_named


def pooler_act(model_config) -> str:
  """The activation after the pooler's dense layer, as our encoder computes it."""
  return model_config.pooler_act or family_named(model_config.family).pooler_act


def _linear(name, index, kernel, bias) -> dict:
  return {f'heads.{name}.{index}.weight': kernel.T, f'heads.{name}.{index}.bias': bias}


def export(head: str, meta: dict, name: str, head_params: dict, pooler: dict,
           model_config) -> tuple[dict, dict]:
  """Our head (+ a trained pooler) -> (head_config's "config", head weights)."""
  kernel, bias = head_params['kernel'], head_params['bias']
  pooling = meta.get('pooling', 'pooler')
  if head != 'span' and pooling == 'mean':
    raise UsageError('the artifact\'s head reads the mean over tokens (model.head.pooling=mean); '
                     'AdapterHub heads read the pooler or [CLS]: train with pooling pooler or cls '
                     'to export')
  if head == 'span':
    config = {'activation_function': 'tanh', 'dropout_prob': None,
              'head_type': 'question_answering', 'label2id': None, 'layers': 1, 'num_labels': 2}
    return config, _linear(name, 1, kernel, bias)
  labels = list(meta.get('label_names') or [])
  num = int(kernel.shape[1])
  if head == 'classification' and len(labels) != num:
    raise UsageError(f'artifact has {len(labels)} label names but a head with {num} outputs')
  family = family_named(model_config.family)
  config = {'activation_function': pooler_act(model_config), 'bias': True,
            'dropout_prob': None, 'head_type': 'classification',
            'label2id': {str(l): i for i, l in enumerate(labels)} if head == 'classification' else None,
            'layers': 1, 'num_labels': num, 'use_pooler': pooling == 'pooler'}
  if pooling == 'cls' or (not pooler and family.adapterhub_modules.pooled_output):
    return config, _linear(name, 1, kernel, bias)  # a trained pooler under cls is unused
  if not pooler:
    raise UsageError(f'AdapterHub\'s {family.adapterhub_model_class} hands its heads no pooler '
                     'output and the artifact does not carry its (frozen) pooler; train the '
                     'pooler (trainable rule ^encoder/pooler/) or use model.head.pooling=cls')
  # A trained pooler: AdapterHub's two-layer head on the raw [CLS] vector carries it.
  config.update(layers=2, use_pooler=False)
  return config, {**_linear(name, 1, pooler['kernel'], pooler['bias']),
                  **_linear(name, 4, kernel, bias)}


def _read_state(head_state: dict, name) -> dict:
  state = {}
  for key, value in head_state.items():
    m = re.fullmatch(rf'heads\.{re.escape(str(name))}\.(\d+)\.(weight|bias)', key)
    if not m:
      raise UsageError(f'head weight {key!r} does not belong to head {name!r}')
    state[(int(m[1]), m[2])] = np.asarray(value, np.float32)
  return state


def _linear_of(state: dict, name, index: int, out_dim: int, d: int):
  """(kernel [d, out], bias) of the head's layer `index`; bias=False heads get zeros."""
  w = state.get((index, 'weight'))
  if w is None or w.shape != (out_dim, d):
    raise UsageError(f'head {name!r}: expected heads.{name}.{index}.weight of shape '
                     f'({out_dim}, {d}), got {None if w is None else w.shape}')
  return w.T, state.get((index, 'bias'), np.zeros((out_dim,), np.float32))


def import_(head_config: dict, head_state: dict, model_config):
  """(head kind, label names, num outputs, flat params, pooling) from head_config + weights."""
  hc, name = head_config.get('config') or {}, head_config.get('name')
  kind, layers = hc.get('head_type'), hc.get('layers', 1)
  state, d = _read_state(head_state, name), model_config.hidden_size
  if kind == 'question_answering':
    if layers != 1 or hc.get('num_labels', 2) != 2:
      raise UsageError(f'question answering head with layers={layers}, '
                       f'num_labels={hc.get("num_labels")}: only layers=1, 2 labels imports')
    return 'span', [], 2, {('head',) + k: v for k, v in zip(
        ('kernel', 'bias'), _linear_of(state, name, 1, 2, d))}, 'pooler'
  if kind != 'classification':
    raise UsageError(f'AdapterHub head type {kind!r} has no equivalent here; classification '
                     '(incl. regression) and question_answering heads import')
  num = int(hc.get('num_labels', 2))
  pooling, layer_of = _classifier_layers(hc, model_config)
  flat = {}
  for index, (scope, out_dim) in layer_of.items():
    flat[scope + ('kernel',)], flat[scope + ('bias',)] = _linear_of(
        state, name, index, num if out_dim is None else out_dim, d)
  if num == 1:
    return 'regression', [], 1, flat, pooling
  label2id = hc.get('label2id') or {}
  if sorted(label2id.values()) == list(range(num)):
    labels = [l for l, _ in sorted(label2id.items(), key=lambda kv: kv[1])]
  else:
    labels = [f'LABEL_{i}' for i in range(num)]
  return 'classification', labels, num, flat, pooling


def _classifier_layers(hc: dict, model_config):
  """(the pooling a classification head reads, {its layer index: (our scope, out dim, None
  for the labels)}), refusing heads our pooler + linear head cannot compute."""
  layers, use_pooler = hc.get('layers', 1), bool(hc.get('use_pooler'))
  act, family = hc.get('activation_function'), family_named(model_config.family)
  if layers == 1 and use_pooler and not family.adapterhub_modules.pooled_output:
    raise UsageError(f'the head reads a pooler output (use_pooler=True), which AdapterHub\'s '
                     f'{family.adapterhub_model_class} does not have; importable: '
                     'use_pooler=False')
  if layers == 1:  # on the pooler output, or on the [CLS] state (use_pooler=False)
    return 'pooler' if use_pooler else 'cls', {1: (('head',), None)}
  if layers == 2 and not use_pooler and act == pooler_act(model_config):
    return 'pooler', {1: (('encoder', 'pooler'), model_config.hidden_size),
                      4: (('head',), None)}
  raise UsageError(
      f'classification head with layers={layers}, use_pooler={use_pooler}, '
      f'activation_function={act!r} does not fit a linear head on the pooled [CLS] output; '
      f'importable: layers=1, or layers=2 with {pooler_act(model_config)} and use_pooler=False')
