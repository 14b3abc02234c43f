"""The HTTP API (FastAPI on uvicorn): predictions, adapter management, health, metrics.

  POST   /v1/predict          {"inputs": [{"task", "text", "text_pair"}, ...]} -> {"outputs": [...]}
  GET    /health              {"status": "ok", ...}
  GET    /v1/adapters         the base's identity and each adapter (task, method, head, labels)
  POST   /v1/adapters         {"path": DIR}: load another artifact without a restart
  DELETE /v1/adapters/{task}  e.g. /v1/adapters/glue/sst2
  GET    /metrics             Prometheus text

Every error is a JSON object {"error": message} with a 4xx status (5xx only for the
server's own faults); no request can take the server down. The body is parsed here, not
by a pydantic model, so that each mistake gets a message naming the offending input
(`inputs[3].text must be a string`) rather than a validation dump. Model calls never run
on the event loop: predictions go through the `Batcher`'s worker thread and adapter loads
through a plain thread, so /health and /metrics answer while the model works.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapter_tuning.errors import UsageError
from adapter_tuning.serving.batcher import Batcher, QueueFull, ShuttingDown
from adapter_tuning.serving.engine import Conflict, Engine, UnknownTask
from adapter_tuning.serving.metrics import ServerMetrics

MAX_BODY_BYTES = 64 * 1024  # per input; texts are truncated to <= 512 tokens anyway


def _error(status: int, message: str) -> HTTPException:
  return HTTPException(status_code=status, detail=message)


def parse_inputs(body: bytes, max_inputs: int) -> list[dict]:
  """The request body -> rows {'task', 'text', 'text_pair'}; HTTPException on any mistake."""
  if len(body) > max_inputs * MAX_BODY_BYTES:
    raise _error(413, f'the body is {len(body)} bytes; at most {max_inputs * MAX_BODY_BYTES}')
  try:
    payload = json.loads(body)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise _error(400, f'malformed JSON: {e}') from None
  if not isinstance(payload, dict) or 'inputs' not in payload:
    raise _error(422, 'the body must be a JSON object {"inputs": [{"task", "text", '
                      '"text_pair"}, ...]}')
  inputs = payload['inputs']
  if not isinstance(inputs, list) or not inputs:
    raise _error(422, '"inputs" must be a non-empty list of {"task", "text", "text_pair"} '
                      'objects')
  if len(inputs) > max_inputs:
    raise _error(413, f'{len(inputs)} inputs in one request; at most {max_inputs} '
                      '(--max_batch_size): split it')
  rows = []
  for i, item in enumerate(inputs):
    if not isinstance(item, dict):
      raise _error(422, f'inputs[{i}] must be an object with "text" (and "task", "text_pair")')
    if 'text' not in item:
      raise _error(422, f'inputs[{i}].text is missing')
    for key in ('text', 'text_pair', 'task'):
      value = item.get(key)
      if not (isinstance(value, str) or (value is None and key != 'text')):
        raise _error(422, f'inputs[{i}].{key} must be a string, not {type(value).__name__}')
    rows.append({'task': item.get('task'), 'text': item['text'],
                 'text_pair': item.get('text_pair')})
  return rows


def check_tasks(rows: list[dict], loaded: list[str]):
  """Unknown tasks are a 404 naming the loaded ones, before the request takes a queue slot."""
  for i, row in enumerate(rows):
    task = row['task']
    if task is None and len(loaded) > 1:
      raise _error(422, f'inputs[{i}] needs a "task" when several adapters are loaded '
                        f'({", ".join(loaded)})')
    if task is not None and task not in loaded:
      raise _error(404, f'no adapter for task {task!r} (inputs[{i}]); loaded: '
                        f'{", ".join(loaded)}')


def _path_label(path: str) -> str:
  """Metric label per route, not per URL: a task name in the path must not grow series."""
  if path.startswith('/v1/adapters/'):
    return '/v1/adapters/{task}'
  known = ('/v1/predict', '/v1/adapters', '/health', '/metrics')
  return path if path in known else 'other'


class _CountRequests:
  """Plain ASGI middleware: each request's status and latency into the metrics."""

  def __init__(self, app, metrics: ServerMetrics):
    self.app = app
    self.metrics = metrics

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)
    start, status = time.perf_counter(), [500]

    async def send_status(message):
      if message['type'] == 'http.response.start':
        status[0] = message['status']
      await send(message)

    try:
      await self.app(scope, receive, send_status)
    finally:
      self.metrics.request(_path_label(scope['path']), status[0], time.perf_counter() - start)


def create_app(engine: Engine, batcher: Batcher, metrics: ServerMetrics,
               drain_timeout_s: float = 60.0) -> FastAPI:
  """The ASGI app; on shutdown (after uvicorn has answered in-flight requests) the batcher
  finishes what is queued and its worker thread stops."""

  @contextlib.asynccontextmanager
  async def lifespan(_app):
    yield
    await asyncio.to_thread(batcher.close, drain_timeout_s)

  app = FastAPI(title='adapter_tuning serve', lifespan=lifespan)
  app.add_middleware(_CountRequests, metrics=metrics)
  metrics.adapters = len(engine.task_names())

  @app.exception_handler(StarletteHTTPException)
  async def http_error(_request, exc: StarletteHTTPException):
    return JSONResponse({'error': str(exc.detail)}, status_code=exc.status_code,
                        headers=getattr(exc, 'headers', None))

  @app.exception_handler(Exception)
  async def server_error(_request, exc: Exception):
    return JSONResponse({'error': f'internal error: {type(exc).__name__}: {exc}'},
                        status_code=500)

  _serving_routes(app, engine, batcher, metrics)
  _adapter_routes(app, engine, metrics)
  return app


def _serving_routes(app: FastAPI, engine: Engine, batcher: Batcher, metrics: ServerMetrics):
  """/v1/predict through the batcher; /health and /metrics, which never wait for the model."""

  @app.post('/v1/predict')
  async def predict(request: Request):
    rows = parse_inputs(await request.body(), batcher.max_batch_size)
    check_tasks(rows, engine.task_names())
    try:
      future = batcher.submit(rows)
    except (QueueFull, ShuttingDown) as e:
      raise HTTPException(503, str(e), headers={'Retry-After': '1'}) from None
    metrics.queue_rows = batcher.queued_rows
    try:
      outputs = await future
    except UnknownTask as e:  # removed while the request waited
      raise _error(404, str(e)) from None
    return {'outputs': outputs}

  @app.get('/health')
  async def health():
    return {'status': 'ok', 'adapters': len(engine.task_names()),
            'queue_rows': batcher.queued_rows}

  @app.get('/metrics')
  async def prometheus():
    metrics.queue_rows = batcher.queued_rows
    return PlainTextResponse(metrics.render(), media_type='text/plain; version=0.0.4')


def _adapter_routes(app: FastAPI, engine: Engine, metrics: ServerMetrics):
  """List, load and remove adapters; loads and removals run off the event loop."""

  @app.get('/v1/adapters')
  async def adapters():
    return engine.describe()

  @app.post('/v1/adapters', status_code=201)
  async def load_adapter(request: Request):
    try:
      payload = json.loads(await request.body())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise _error(400, f'malformed JSON: {e}') from None
    if not isinstance(payload, dict) or not isinstance(payload.get('path'), str):
      raise _error(422, 'the body must be {"path": "an adapter artifact folder on the server"}')
    adapter = await _admin(engine.load, payload['path'])
    metrics.adapters = len(engine.task_names())
    return {'loaded': adapter, 'tasks': engine.task_names()}

  @app.delete('/v1/adapters/{task:path}')
  async def remove_adapter(task: str):
    tasks = await _admin(engine.remove, task)
    metrics.adapters = len(tasks)
    return {'removed': task, 'tasks': tasks}


async def _admin(fn, arg):
  """Runs a load/remove off the event loop; its refusals become 4xx with the reason."""
  try:
    return await asyncio.to_thread(fn, arg)
  except UnknownTask as e:
    raise _error(404, str(e)) from None
  except Conflict as e:
    raise _error(409, str(e)) from None
  except (UsageError, ValueError, OSError) as e:
    first = (str(e).strip() or type(e).__name__).splitlines()[0]
    raise _error(400, f'refused: {first}') from None
