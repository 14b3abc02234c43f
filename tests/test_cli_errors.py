"""Bad input at the command line: one line naming the problem and the fix, exit 2, nothing lost."""

import pytest

from helpers import DEMO_CHECKPOINTED, copy_run, run_train

DEMO = ('--config', 'configs/demo.py')
SST2 = ('--config', 'configs/glue_sst2.py', '--config.data.source=glue_dir')


def _fails(result, code, *needles):
  assert result.returncode == code, (result.returncode, result.stdout[-1000:], result.stderr[-2000:])
  err = result.stderr.strip().splitlines()
  assert err and err[-1].startswith('error: '), result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  for needle in needles:
    assert needle in err[-1], err[-1]


@pytest.mark.parametrize('args,needles', [
    (('--config.lerning_rate=0.1',), ['lerning_rate', 'learning_rate']),
    (('--config.batch_size=big',), ['batch_size']),
    (('--config.batch_size=3.5',), ['batch_size']),
    (('--config.learning_rate=0',), ['learning_rate must be > 0']),
    (('--config.warmup_ratio=1.5',), ['warmup_ratio must be in [0, 1]']),
    (('--config.model.adapter.size=0',), ['model.adapter.size must be > 0']),
    (('--config.model.adapter.placement=sideways',), ['unknown adapter placement']),
    (('--config.data.task=glue/nope',), ['glue/nope', 'glue/sst2']),
    (('--config.data.task=images',), ['unknown data.task']),
    (('--config.trainable=everything',), ['unknown trainable preset']),
    (('--config.model.checkpoint=/no/such/dir',), ['/no/such/dir', 'does not exist']),
    (('--config.data.max_seq_length=100',), ['exceeds the model maximum']),
    (('--config.model.lora.rank=-2',), ['model.lora.rank must be >= 0']),
    (('--config.early_stopping_patience=3',), ['needs evaluations during training',
                                               'eval_every_steps']),
    (('--config.model.lora.rank=4', '--config.model.lora.targets=query,ffn'),
     ['model.lora.targets has', 'query,key,value,attention_output,intermediate,output']),
    (('--config.model.ia3.targets=query',), ['model.ia3.targets has', 'key,value,intermediate']),
    (('--config.model.adapter.placement=parallel', '--config.model.adapter.original_ln_before=true'),
     ['parallel adapter reads the sub-layer input']),
])
def test_demo_usage_errors(tmp_path, args, needles):
  _fails(run_train(*DEMO, '--workdir', tmp_path / 'w', *args), 2, *needles)
  assert not (tmp_path / 'w' / 'checkpoints').exists()


def test_missing_workdir_flag():
  _fails(run_train(*DEMO), 2, '--workdir')


def test_missing_config_file(tmp_path):
  _fails(run_train('--config', 'configs/nope.py', '--workdir', tmp_path), 2, 'configs/nope.py')


def test_missing_data_directory(tmp_path, minilm_dir):
  _fails(run_train(*SST2, f'--config.model.checkpoint={minilm_dir}',
                   '--config.data.data_dir=/no/glue/here', '--workdir', tmp_path), 2,
         '/no/glue/here')


def test_batch_not_divisible_by_devices(tmp_path):
  _fails(run_train(*DEMO, '--workdir', tmp_path, '--config.batch_size=12', devices=8), 2,
         'not divisible by the 8 devices')


def test_workdir_with_a_different_run_is_refused_and_kept(demo_checkpointed_run, tmp_path):
  workdir = copy_run(demo_checkpointed_run, tmp_path / 'w')  # a finished 24-step run
  before = sorted(p.name for p in (workdir / 'checkpoints').iterdir())
  config_before = (workdir / 'config.json').read_text()
  _fails(run_train(*DEMO_CHECKPOINTED, '--workdir', workdir, '--config.num_train_steps=7'), 2,
         'different config', 'num_train_steps', '--overwrite')
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == before
  assert (workdir / 'config.json').read_text() == config_before


def test_overwrite_starts_the_run_over(demo_checkpointed_run, tmp_path):
  workdir = copy_run(demo_checkpointed_run, tmp_path / 'w')  # a finished 24-step run
  again = run_train(*DEMO_CHECKPOINTED, '--workdir', workdir, '--config.num_train_steps=7',
                    '--overwrite')
  assert again.returncode == 0, again.stderr[-2000:]
  assert 'resumed' not in again.stdout
  assert '"num_train_steps": 7' in (workdir / 'config.json').read_text()
