"""Entry point: python -m adapter_tuning.train --config configs/glue_mnli.py --workdir DIR.

Any config key can be overridden: --config.learning_rate=1e-3 --config.trainable=full.
Rerunning the same command resumes from the latest checkpoint in DIR. On a TPU pod or a
cluster (Slurm, etc.), jax.distributed is initialised automatically; elsewhere pass
--coordinator_address, --num_processes and --process_id to run several processes.
"""

from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Config file (ml_collections).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Run folder: checkpoints, metrics, adapter artifact.')
flags.DEFINE_bool('overwrite', False, 'Start over in a workdir that holds a different run.')
flags.DEFINE_bool('verbose', False, 'Show tracebacks for errors.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() and let JAX find the '
                  'cluster (Cloud TPU VM pods, Slurm, Open MPI); launch/tpu_pod.sh sets it.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process).')
flags.DEFINE_integer('process_id', None, 'This process (multi-process).')
flags.DEFINE_string('compilation_cache', os.path.expanduser('~/.cache/adapter_tuning/jax'),
                    'Persistent XLA compilation cache folder ("" = off).')


def init_distributed():
  """jax.distributed before any other JAX call: explicit flags, or auto-detected clusters."""
  import jax
  if FLAGS.coordinator_address or FLAGS.num_processes:
    if FLAGS.process_id is None or not FLAGS.num_processes or not FLAGS.coordinator_address:
      from adapter_tuning.errors import UsageError
      raise UsageError('multi-process runs need all of --coordinator_address, --num_processes '
                       'and --process_id')
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif FLAGS.distributed or _in_cluster():
    jax.distributed.initialize()


def _in_cluster() -> bool:
  env = os.environ
  slurm_multi = int(env.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in env
  tpu_pod = 'TPU_WORKER_HOSTNAMES' in env and ',' in env.get('TPU_WORKER_HOSTNAMES', '')
  return slurm_multi or tpu_pod or 'OMPI_COMM_WORLD_SIZE' in env


def _run():
  from adapter_tuning.errors import UsageError
  if not FLAGS.workdir:
    raise UsageError('--workdir is required: the folder for checkpoints, metrics and the '
                     'adapter artifact')
  init_distributed()
  import jax
  if FLAGS.compilation_cache:
    jax.config.update('jax_compilation_cache_dir', FLAGS.compilation_cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  from adapter_tuning.training.trainer import train_and_evaluate
  train_and_evaluate(FLAGS.config, FLAGS.workdir, overwrite=FLAGS.overwrite)


def _check_config_path(argv):
  """A missing config file is a one-line error here, before absl prints its traceback."""
  for i, arg in enumerate(argv):
    path = arg.split('=', 1)[1] if arg.startswith('--config=') else (
        argv[i + 1] if arg == '--config' and i + 1 < len(argv) else None)
    if path and not os.path.exists(path.split(':')[0]):
      print(f'error: config file {path} does not exist; pass e.g. --config configs/glue_sst2.py',
            file=sys.stderr)
      sys.exit(2)


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  _check_config_path(argv)
  verbose = '--verbose' in argv
  from adapter_tuning.cli import run_guarded
  try:
    FLAGS(argv)
    FLAGS.config.keys()  # a config file that failed to load raises here, not at parse time
  except flags.Error as e:
    print(f'error: {str(e).splitlines()[0]}; see adapter_tuning/config.py for keys and types',
          file=sys.stderr)
    return 2
  except (AttributeError, KeyError) as e:  # ml_collections: an unknown key in an override
    detail = ' '.join(str(e).replace('\\n', ' ').replace('\\', '').replace("'", '').split())
    print(f'error: unknown config key in an override: {detail}; see adapter_tuning/config.py',
          file=sys.stderr)
    return 2
  except Exception as e:  # pylint: disable=broad-except  # a config file that fails to load
    if verbose:
      raise
    print(f'error: could not load the config ({type(e).__name__}: {str(e).splitlines()[0]}); '
          'check the --config path and its Python', file=sys.stderr)
    return 2
  import logging
  logging.basicConfig(level=logging.WARNING)
  return run_guarded(_run, verbose)


if __name__ == '__main__':
  from adapter_tuning.training import hugepages
  hugepages.reexec()
  sys.exit(main())
