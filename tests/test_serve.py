"""The HTTP server, run as users run it (a subprocess on 127.0.0.1, a free port).

Served outputs equal `predict`'s, concurrent single-row requests are batched together, bad
requests get a 4xx with a message and leave the server up, adapters load and unload
without a restart, and SIGTERM answers what is in flight and exits 0.
"""

import http.client
import json
import os
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

import flax.traverse_util as tu
import httpx
import numpy as np
import pytest

from adapter_tuning import peft
from adapter_tuning.data import demo
from adapter_tuning.interop import artifact
from adapter_tuning.interop.pretrained import load_pretrained
from adapter_tuning.predict import predict_rows
from adapter_tuning.serving.multi_adapter import MultiTaskModel
from adapter_tuning.training import trainable as tl
from helpers import ROOT

TASKS = ('demo/a', 'demo/b', 'demo/c')
LONG = ' '.join(['good film'] * 60)  # > 32 tokens: truncated to the adapters' max length


def _make_artifact(base, directory, task, method, head='classification', labels=('neg', 'pos'),
                   seed=0):
  """An artifact as training writes it, with random (non-identity) trained weights."""
  pre = load_pretrained(base, adapter=method)
  rng = np.random.default_rng(seed)
  n = 1 if head == 'regression' else len(labels)
  params = {'encoder': pre.params, 'head': {
      'kernel': rng.normal(0, 0.5, (pre.config.hidden_size, n)), 'bias': rng.normal(0, 0.5, n)}}
  rules = tl.resolve('adapters', pre.config.num_layers)
  trained, _ = tl.split(params, rules)
  trained = tu.unflatten_dict({k: (np.asarray(v) + rng.normal(0, 0.05, np.shape(v))).astype(
      np.float32) for k, v in tu.flatten_dict(trained).items()})
  artifact.save(directory, trained, {
      'task': task, 'head': head, 'label_names': [] if head == 'regression' else list(labels),
      'num_outputs': n, 'peft': peft.to_meta(pre.adapter),
      'trainable_rules': [list(r) for r in rules],
      'base': {**pre.identity, 'path': str(base)}, 'max_seq_length': 32})
  return directory


@pytest.fixture(scope='module')
def arts(tmp_path_factory):
  """Three served tasks of three methods/heads, one to hot-load, and two that must be refused."""
  root = tmp_path_factory.mktemp('serve')
  base = demo.ensure_checkpoint(root / 'base')
  lora = peft.method_named('lora').from_meta({'rank': 4})
  ia3 = peft.method_named('ia3').from_meta({'targets': ['key', 'value', 'intermediate']})
  out = {
      'a': _make_artifact(base, root / 'a', 'demo/a', {'size': 8}),
      'b': _make_artifact(base, root / 'b', 'demo/b', lora, labels=('x', 'y', 'z'), seed=1),
      'c': _make_artifact(base, root / 'c', 'demo/c', {'size': 4}, head='regression', seed=2),
      'd': _make_artifact(base, root / 'd', 'demo/d', ia3, seed=3),
  }
  other = demo.ensure_checkpoint(root / 'other_base', seed=99)
  out['other'] = _make_artifact(other, root / 'other', 'demo/other', {'size': 8})
  broken = root / 'broken'
  broken.mkdir()
  (broken / 'config.json').write_bytes((out['a'] / 'config.json').read_bytes())
  (broken / 'weights.safetensors').write_bytes((out['a'] / 'weights.safetensors').read_bytes()[:50])
  out['broken'] = broken
  return out


class Server:
  """python -m adapter_tuning.serve in a subprocess; `url` once it prints its ready line."""

  def __init__(self, tmp, adapters, *flags):
    self.log = pathlib.Path(tmp) / f'serve{time.monotonic_ns()}.log'
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
    with open(self.log, 'w') as err:
      self.proc = subprocess.Popen(
          [sys.executable, '-m', 'adapter_tuning.serve', '--adapter',
           ','.join(str(a) for a in adapters), '--port', '0', *flags],
          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()
    try:
      line = lines.get(timeout=180)
    except queue.Empty:
      line = ''
    match = re.search(r'on (http://\S+)', line)
    if not match:
      self.stop()
      raise AssertionError(f'server did not start: {line!r}\n{self.log.read_text()[-3000:]}')
    self.url = match.group(1)

  def client(self):
    return httpx.Client(base_url=self.url, timeout=60)

  def stop(self, timeout=60) -> int:
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
    try:
      return self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      raise AssertionError(f'server ignored SIGTERM:\n{self.log.read_text()[-3000:]}') from None


@pytest.fixture(scope='module')
def server(arts, tmp_path_factory):
  srv = Server(tmp_path_factory.mktemp('log'), [arts['a'], arts['b'], arts['c']],
               '--max_batch_size', '8', '--max_wait_ms', '10')
  yield srv
  srv.stop()


def _rows(n, seed=0):
  rng = np.random.default_rng(seed)
  words = ['the film', 'a great movie', 'it was dull', 'nothing else', 'quite long and bland',
           LONG]
  rows = []
  for i in range(n):
    task = TASKS[i % 3]
    pair = str(rng.choice(words)) if i % 2 else None
    rows.append({'task': task, 'text': f'{rng.choice(words)} {i}', 'text_pair': pair})
  return rows


def _close(served, expected):
  assert [o['task'] for o in served] == [o['task'] for o in expected]
  for got, want in zip(served, expected):
    assert got.keys() == want.keys() and got.get('label') == want.get('label')
    key = 'score' if 'score' in want else 'logits'
    np.testing.assert_allclose(got[key], want[key], atol=1e-5)


def test_served_outputs_equal_predict_for_mixed_task_batches(server, arts):
  rows = _rows(20)
  expected = predict_rows(MultiTaskModel([arts['a'], arts['b'], arts['c']]), rows, 8, 32)
  assert any('score' in e for e in expected) and any(len(e.get('logits', ())) == 3
                                                     for e in expected)
  # Requests of 8, 5, 4, 2 and 1 rows sent at once: the batcher mixes them into shared batches.
  sizes, results = [8, 5, 4, 2, 1], {}
  starts = np.cumsum([0] + sizes)

  def send(k):
    with server.client() as c:
      r = c.post('/v1/predict', json={'inputs': rows[starts[k]:starts[k + 1]]})
      results[k] = (r.status_code, r.json())

  threads = [threading.Thread(target=send, args=(k,)) for k in range(len(sizes))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert all(status == 200 for status, _ in results.values()), results
  served = [o for k in range(len(sizes)) for o in results[k][1]['outputs']]
  _close(served, expected)


def _batch_stats(c) -> tuple[float, float]:
  text = c.get('/metrics').text
  total = float(re.search(r'^adapter_serve_batch_size_sum (\S+)$', text, re.M).group(1))
  count = float(re.search(r'^adapter_serve_batch_size_count (\S+)$', text, re.M).group(1))
  return total, count


def _poster(url):
  """A keep-alive connection that POSTs one row: stdlib http.client, whose few microseconds
  per request keep the clients (threads of this process) from being what is measured."""
  parsed = urllib.parse.urlparse(url)
  conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)

  def post(row):
    conn.request('POST', '/v1/predict', json.dumps({'inputs': [row]}),
                 {'Content-Type': 'application/json'})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    return json.loads(response.read())['outputs'][0]

  return post


def test_concurrent_clients_are_batched(server):
  """One server (--max_wait_ms 10, --max_batch_size 8) for both: one client's requests run
  alone, each after waiting out the batching window; eight clients' requests share batches."""
  rows = _rows(48, seed=1)
  post = _poster(server.url)
  for row in rows[:8]:  # connection set up, every shape already warm
    post(row)
  t = time.perf_counter()
  alone = [post(row) for row in rows]
  one_by_one = time.perf_counter() - t
  with server.client() as c:
    before = _batch_stats(c)
  together = [None] * len(rows)

  def client(k):
    post = _poster(server.url)
    for i in range(k, len(rows), 8):
      together[i] = post(rows[i])

  threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
  t = time.perf_counter()
  for th in threads:
    th.start()
  for th in threads:
    th.join()
  concurrent = time.perf_counter() - t
  with server.client() as c:
    after = _batch_stats(c)
  batches = after[1] - before[1]
  mean_batch = (after[0] - before[0]) / batches
  print(f'48 requests: one client {one_by_one:.3f}s, 8 clients {concurrent:.3f}s '
        f'({one_by_one / concurrent:.1f}x), {batches:.0f} batches of {mean_batch:.1f} rows')
  _close(together, alone)  # batching changes no output
  assert after[0] - before[0] == len(rows)
  assert mean_batch >= 2.0  # batched; the speed-up itself is bench/serve.py's (no timed asserts)


BAD_REQUESTS = [  # (method, path, body, status, message)
    ('POST', '/v1/predict', b'{"inputs": [{"text": "x"', 400, 'malformed JSON'),
    ('POST', '/v1/predict', b'[1, 2]', 422, 'must be a JSON object'),
    ('POST', '/v1/predict', b'{"inputs": []}', 422, 'non-empty list'),
    ('POST', '/v1/predict', b'{"inputs": [{"task": "demo/a"}]}', 422, 'inputs[0].text is missing'),
    ('POST', '/v1/predict', b'{"inputs": [{"task": "demo/a", "text": 3}]}', 422,
     'inputs[0].text must be a string'),
    ('POST', '/v1/predict', b'{"inputs": [{"task": "demo/a", "text": "x", "text_pair": [1]}]}',
     422, 'inputs[0].text_pair must be a string'),
    ('POST', '/v1/predict', b'{"inputs": [{"text": "x"}]}', 422,
     'needs a "task" when several adapters are loaded'),
    ('POST', '/v1/predict', b'{"inputs": [{"task": "demo/a", "text": "x"}, '
     b'{"task": "glue/cola", "text": "x"}]}', 404,
     "no adapter for task 'glue/cola' (inputs[1]); loaded: demo/a, demo/b, demo/c"),
    ('POST', '/v1/predict', b'{"inputs": [' + b', '.join([b'{"task": "demo/a", "text": "x"}'] * 9)
     + b']}', 413, '9 inputs in one request; at most 8'),
    ('GET', '/v1/predict', None, 405, 'Method Not Allowed'),
    ('GET', '/nowhere', None, 404, 'Not Found'),
    ('POST', '/v1/adapters', b'{"path": 3}', 422, '"path"'),
    ('DELETE', '/v1/adapters/glue/cola', None, 404, "no adapter for task 'glue/cola'"),
]


@pytest.mark.parametrize('method,path,body,status,message', BAD_REQUESTS,
                         ids=[f'{m} {p} {s}' for m, p, _, s, _ in BAD_REQUESTS])
def test_bad_request_gets_status_and_message(server, method, path, body, status, message):
  with server.client() as c:
    r = c.request(method, path, content=body)
    assert r.status_code == status, r.text
    assert message in r.json()['error']
    assert c.get('/health').status_code == 200
    ok = c.post('/v1/predict', json={'inputs': [{'task': 'demo/a', 'text': 'still here'}]})
    assert ok.status_code == 200 and ok.json()['outputs'][0]['task'] == 'demo/a'


def test_hot_load_and_delete(server, arts):
  row = {'task': 'demo/d', 'text': 'a great movie', 'text_pair': 'the film'}
  with server.client() as c:
    r = c.post('/v1/adapters', json={'path': str(arts['d'])})
    assert r.status_code == 201, r.text
    assert r.json()['loaded']['method'].startswith('ia3') and 'demo/d' in r.json()['tasks']
    listed = c.get('/v1/adapters').json()
    assert [a['task'] for a in listed['adapters']] == [*TASKS, 'demo/d']
    assert listed['base']['sha256'] == artifact.load(arts['a'])[0]['base']['sha256']
    mixed = [row, {'task': 'demo/a', 'text': 'it was dull'}]
    got = c.post('/v1/predict', json={'inputs': mixed}).json()['outputs']
    _close(got[:1], predict_rows(MultiTaskModel([arts['d']]), [row], 8, 32))
    refusals = [(arts['d'], 409, 'already loaded'),
                (arts['other'], 400, 'was trained on base'),
                (arts['broken'], 400, 'weights.safetensors'),
                (arts['a'].parent / 'missing', 400, 'no such folder')]
    for path, status, message in refusals:
      r = c.post('/v1/adapters', json={'path': str(path)})
      assert r.status_code == status and message in r.json()['error'], r.text
    r = c.delete('/v1/adapters/demo/d')
    assert r.status_code == 200 and r.json()['tasks'] == list(TASKS)
    r = c.post('/v1/predict', json={'inputs': [row]})
    assert r.status_code == 404 and 'loaded: demo/a, demo/b, demo/c' in r.json()['error']
    assert c.get('/health').json()['adapters'] == 3


def test_sigterm_answers_in_flight_requests_and_exits_0(arts, tmp_path):
  srv = Server(tmp_path, [arts['a']], '--max_batch_size', '4', '--max_wait_ms', '1500')
  try:
    with srv.client() as c:
      r = c.delete('/v1/adapters/demo/a')
      assert r.status_code == 409 and 'only adapter' in r.json()['error']
    answers = []

    def send(i):
      with srv.client() as c:
        answers.append(c.post('/v1/predict', json={'inputs': [{'text': f'film {i}'}]}))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for t in threads:
      t.start()
    deadline = time.monotonic() + 10
    while httpx.get(srv.url + '/health').json()['queue_rows'] < 3:  # all three wait in the queue
      assert time.monotonic() < deadline, 'the requests never reached the queue'
      time.sleep(0.02)
    srv.proc.send_signal(signal.SIGTERM)
    for t in threads:
      t.join(30)
    assert [a.status_code for a in answers] == [200] * 3
    assert all(a.json()['outputs'][0]['task'] == 'demo/a' for a in answers)
    assert srv.proc.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
      httpx.get(srv.url + '/health')
  finally:
    srv.stop()


def _serve_cli(*args):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, '-m', 'adapter_tuning.serve', *map(str, args)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_start_up_mistakes_are_one_line_errors(arts, tmp_path):
  import socket
  missing = _serve_cli('--adapter', tmp_path / 'nope', '--port', '0')
  assert missing.returncode == 2, missing.stderr
  assert missing.stderr.strip().splitlines() == [
      f'error: {tmp_path / "nope"}: no such folder; pass the adapter/ folder of a training run']
  with socket.socket() as taken:
    taken.bind(('127.0.0.1', 0))
    taken.listen(1)
    busy = _serve_cli('--adapter', arts['a'], '--port', taken.getsockname()[1])
  assert busy.returncode == 2 and busy.stderr.startswith('error: cannot listen on 127.0.0.1:')
  assert len(busy.stderr.strip().splitlines()) == 1
  assert _serve_cli('--adapter', arts['a'], '--max_batch_size', '0').returncode == 2


def test_batcher_fills_batches_bounds_the_queue_and_drains_on_close():
  """The queue discipline alone (no model): whole requests fill batches of at most
  max_batch_size rows in arrival order, the queue refuses rows beyond its bound, a failing
  batch fails only its own requests, and close() answers what is queued at once."""
  import asyncio

  from adapter_tuning.serving.batcher import Batcher, QueueFull, ShuttingDown
  seen, gate = [], threading.Event()

  def run(requests):
    gate.wait(30)
    seen.append([len(r) for r in requests])
    if ['boom'] in requests:  # a bug in the model call: this batch's requests fail, no others
      raise RuntimeError('boom')
    return [[2 * x for x in r] for r in requests]

  async def scenario():
    batcher = Batcher(run, max_batch_size=4, max_wait_ms=2000, max_queue_rows=6)
    first = [batcher.submit([1]), batcher.submit([2, 3, 4])]  # 4 rows: goes without waiting
    while batcher.queued_rows:  # the worker took them and waits at the gate
      await asyncio.sleep(0.01)
    later = [batcher.submit([5, 6, 7]), batcher.submit(['boom'])]
    later.append(batcher.submit([8, 9]))
    with pytest.raises(QueueFull, match='at most 6'):
      batcher.submit([10])
    gate.set()
    await asyncio.to_thread(batcher.close, 30)  # the last batch waits no longer
    with pytest.raises(ShuttingDown):
      batcher.submit([11])
    return await asyncio.gather(*first, *later, return_exceptions=True)

  results = asyncio.run(scenario())
  assert seen == [[1, 3], [3, 1], [2]]
  assert results[:2] == [[2], [4, 6, 8]] and results[4] == [16, 18]
  assert all(isinstance(r, RuntimeError) for r in results[2:4])
