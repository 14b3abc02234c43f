"""python -m adapter_tuning.serve: an HTTP server for many task adapters on one frozen base.

  --adapter runs/sst2/adapter,runs/rte/adapter --host 127.0.0.1 --port 8000 \\
  --max_batch_size 32 --max_wait_ms 5

One base stays resident, every artifact is loaded once, and requests arriving within
`--max_wait_ms` of each other share one mixed-task batch (per-example routing,
serving/multi_adapter.py). Every (rows, length) shape is compiled before the server prints
its `serving ... on http://HOST:PORT` line, so the first request is as fast as the rest.
The API is in serving/http_app.py; `--port 0` takes any free port (the line names it).
SIGTERM (or Ctrl-C) stops accepting connections, answers every request already received,
and exits 0.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys

from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string('adapter', None, 'Adapter artifact folder(s), comma-separated.')
flags.DEFINE_string('base', None, 'Base checkpoint (default: the path recorded in the artifact).')
flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on.')
flags.DEFINE_integer('port', 8000, 'Port to listen on (0 = any free port).')
flags.DEFINE_integer('max_batch_size', 32, 'Rows per model call (and per request), at most.')
flags.DEFINE_float('max_wait_ms', 5.0, 'How long a batch waits for more requests to join it.')
flags.DEFINE_integer('max_queue', 0, 'Rows that may wait for a batch (0 = 32 x max_batch_size); '
                     'beyond it requests get 503.')
flags.DEFINE_integer('max_seq_length', 0, 'Truncation length (0 = what each adapter trained with).')
flags.DEFINE_float('drain_timeout_s', 60.0, 'On SIGTERM, how long in-flight requests may take.')
flags.DEFINE_bool('access_log', False, 'Log every request (uvicorn access log).')
flags.DEFINE_string('compilation_cache', os.path.expanduser('~/.cache/adapter_tuning/jax'),
                    'Persistent XLA compilation cache folder ("" = off).')
flags.DEFINE_bool('verbose', False, 'Show tracebacks for errors.')


def _check_flags():
  from adapter_tuning.errors import UsageError
  if not FLAGS.adapter:
    raise UsageError('--adapter is required (one artifact folder, or several comma-separated)')
  if FLAGS.max_batch_size < 1:
    raise UsageError(f'--max_batch_size must be at least 1, not {FLAGS.max_batch_size}')
  if FLAGS.max_wait_ms < 0:
    raise UsageError(f'--max_wait_ms must be 0 or more, not {FLAGS.max_wait_ms}')
  if not 0 <= FLAGS.port < 65536:
    raise UsageError(f'--port must be in 0..65535, not {FLAGS.port}')
  if FLAGS.max_queue and FLAGS.max_queue < FLAGS.max_batch_size:
    raise UsageError(f'--max_queue ({FLAGS.max_queue}) must hold one full batch '
                     f'(--max_batch_size {FLAGS.max_batch_size})')


def listen(host: str, port: int) -> socket.socket:
  """Binds before the model loads, so a taken port fails in a second, not after warm-up."""
  from adapter_tuning.errors import UsageError
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
  except OSError as e:
    raise UsageError(f'cannot listen on {host}:{port}: {e.strerror or e}; pick another '
                     '--port or --host') from None
  sock.listen(2048)
  return sock


def make_server(app, log_level: str = 'info'):
  """uvicorn's Server, except that a SIGTERM it drained ends the process with 0.

  uvicorn re-raises the signal it caught once its graceful shutdown is done, so the process
  dies of SIGTERM (exit -15) even though every request was answered; a supervisor would
  read that as a crash. Here the handlers only ask uvicorn to shut down.
  """
  import uvicorn

  class Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
      old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
      try:
        yield
      finally:
        for s, handler in old.items():
          signal.signal(s, handler)

  config = uvicorn.Config(app, log_level=log_level, access_log=FLAGS.access_log,
                          timeout_graceful_shutdown=FLAGS.drain_timeout_s, lifespan='on')
  return Server(config)


def _run():
  _check_flags()
  import jax
  if FLAGS.compilation_cache:
    jax.config.update('jax_compilation_cache_dir', FLAGS.compilation_cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  from adapter_tuning.serving.batcher import Batcher
  from adapter_tuning.serving.engine import Engine
  from adapter_tuning.serving.http_app import create_app
  from adapter_tuning.serving.metrics import ServerMetrics
  sock = listen(FLAGS.host, FLAGS.port)
  # Until uvicorn takes over the signals, a SIGTERM (nothing in flight yet) just ends the start.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
  log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
  engine = Engine([d for d in FLAGS.adapter.split(',') if d], FLAGS.base, FLAGS.max_batch_size,
                  FLAGS.max_seq_length, log=log)
  metrics = ServerMetrics(FLAGS.max_batch_size)
  batcher = Batcher(engine.run_batch, FLAGS.max_batch_size, FLAGS.max_wait_ms,
                    FLAGS.max_queue or 32 * FLAGS.max_batch_size, on_batch=metrics.batch)
  app = create_app(engine, batcher, metrics, FLAGS.drain_timeout_s)
  host, port = sock.getsockname()[:2]
  print(f'serving {", ".join(engine.task_names())} on http://{host}:{port}', flush=True)
  make_server(app).run(sockets=[sock])


def main(argv=None) -> int:
  from adapter_tuning.cli import flags_main
  return flags_main(FLAGS, _run, list(sys.argv if argv is None else argv))


if __name__ == '__main__':
  from adapter_tuning.training import hugepages
  hugepages.reexec()
  sys.exit(main())
