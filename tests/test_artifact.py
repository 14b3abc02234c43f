"""The adapter artifact: what save writes, what load reads back, and what it refuses."""

import json

import numpy as np
import pytest

from adapter_tuning.errors import UsageError
from adapter_tuning.interop import artifact

PARAMS = {'encoder': {'layer_0': {'ffn_adapter': {'down': {'kernel': np.arange(6.).reshape(2, 3),
                                                           'bias': np.zeros(3)}}}},
          'head': {'kernel': np.ones((4, 2), np.float32), 'bias': np.array([0.5, -0.5])}}
META = {'task': 'glue/sst2', 'head': 'classification', 'label_names': ['negative', 'positive'],
        'num_outputs': 2, 'trainable_rules': [['.*', 'train']],
        'base': {'name': 'base-a', 'sha256': 'a' * 64}}


def test_round_trip_keeps_every_tensor_as_float32_and_the_meta(tmp_path):
  artifact.save(tmp_path / 'adapter', PARAMS, META)
  assert sorted(p.name for p in (tmp_path / 'adapter').iterdir()) == ['config.json',
                                                                      'weights.safetensors']
  meta, params = artifact.load(tmp_path / 'adapter')
  assert meta['format_version'] == artifact.FORMAT_VERSION
  assert {k: v for k, v in meta.items() if k != 'format_version'} == META
  down = params['encoder']['layer_0']['ffn_adapter']['down']
  np.testing.assert_array_equal(down['kernel'], PARAMS['encoder']['layer_0']['ffn_adapter']
                                ['down']['kernel'])
  assert down['kernel'].dtype == np.float32 and params['head']['bias'].dtype == np.float32
  np.testing.assert_array_equal(params['head']['bias'], [0.5, -0.5])


def test_saving_again_replaces_the_artifact_and_leaves_no_temporary_folder(tmp_path):
  artifact.save(tmp_path / 'adapter', PARAMS, META)
  artifact.save(tmp_path / 'adapter', {'head': {'bias': np.array([1.0])}}, {**META, 'step': 2})
  meta, params = artifact.load(tmp_path / 'adapter')
  assert meta['step'] == 2 and list(params) == ['head']
  assert sorted(p.name for p in tmp_path.iterdir()) == ['adapter']  # no .tmp / .old left


def test_a_folder_that_is_not_an_artifact_is_refused_with_the_fix(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps(META))
  with pytest.raises(UsageError, match='is not an adapter artifact.*adapter/ folder'):
    artifact.load(tmp_path)


def test_another_base_is_refused_naming_both():
  with pytest.raises(UsageError, match="trained on base 'base-a'.*base given is 'base-b'"):
    artifact.check_base(META, {'name': 'base-b', 'sha256': 'b' * 64}, 'X')
  artifact.check_base(META, {'name': 'renamed copy', 'sha256': 'a' * 64}, 'X')  # same weights
