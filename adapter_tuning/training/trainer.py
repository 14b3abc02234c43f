"""`train_and_evaluate(config, workdir)`: the whole path config -> data -> model -> steps.

The loop is deliberately plain: one jitted train step over the trainable subtree, metrics
fetched one step late (so the host never stalls the device, and fake CPU devices never
pile up collectives), NaN/Inf stop the run, checkpoints every N steps and at the end,
evaluation with the task's official metrics, and the adapter artifact at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

from adapter_tuning.config import validate
from adapter_tuning.data import batching
from adapter_tuning.data.tasks import load_task_data
from adapter_tuning.errors import RunFailure, UsageError
from adapter_tuning.interop import artifact
from adapter_tuning.models.heads import TargetScale, TaskModel
from adapter_tuning.peft.bottleneck import AdapterConfig
from adapter_tuning.training import evaluation, parallel, precompile, steps
from adapter_tuning.training import trainable as trainable_lib
from adapter_tuning.training.checkpointing import Checkpointer
from adapter_tuning.training.reporting import Reporter


@dataclasses.dataclass
class Setup:
  """Everything built from the config before the first step; also used by predict/bench."""

  model: TaskModel
  params: dict  # full tree {'encoder', 'head'}
  rules: tuple
  pretrained: object
  data: object
  adapter: AdapterConfig | None
  target_scale: TargetScale  # regression targets' train-split scale (identity otherwise)


def adapter_config(config) -> AdapterConfig | None:
  a = config.model.adapter
  if a.placement == 'none':
    return None
  # layers: None or () = every layer (None cannot be written on a command line).
  return AdapterConfig(size=a.size, placement=a.placement, activation=a.activation,
                       init_scale=a.init_scale, layers=a.layers or None, seed=config.seed,
                       original_ln_before=a.get('original_ln_before', False))


def resolve_checkpoint_path(config, workdir: pathlib.Path) -> str:
  if config.data.task == 'demo' and not config.model.checkpoint:
    from adapter_tuning.data import demo
    return str(demo.ensure_checkpoint(workdir / 'demo_base'))
  if not config.model.checkpoint:
    raise UsageError('model.checkpoint is empty; set it to a Hugging Face checkpoint '
                     'directory or hub name')
  return config.model.checkpoint


def build(config, workdir: pathlib.Path, with_train: bool = True) -> Setup:
  from adapter_tuning.interop.pretrained import load_pretrained
  adapter = adapter_config(config)
  dtype = jnp.bfloat16 if config.model.dtype == 'bfloat16' else jnp.float32
  pre = load_pretrained(resolve_checkpoint_path(config, workdir), adapter, dtype=dtype)
  if config.data.max_seq_length > pre.config.max_seq_length:
    raise UsageError(f'data.max_seq_length={config.data.max_seq_length} exceeds the model '
                     f'maximum of {pre.config.max_seq_length} positions; lower it')
  data = load_task_data(config, pre.tokenizer, with_train=with_train)
  hidden = pre.config.hidden_size
  key = jax.random.PRNGKey(config.seed + 1)
  head = {'kernel': np.asarray(0.02 * jax.random.normal(key, (hidden, data.num_outputs))),
          'bias': np.zeros((data.num_outputs,), np.float32)}
  params = {'encoder': pre.params, 'head': head}
  rules = trainable_lib.resolve(config.trainable, pre.config.num_layers)
  model = TaskModel(pre.config, adapter, data.head, data.num_outputs, dtype=dtype,
                    remat=config.model.remat, scan=config.model.scan_layers,
                    pooling=config.model.head.pooling)
  scale = TargetScale()
  if data.head == 'regression' and config.model.head.standardize_targets and with_train:
    scale = TargetScale.from_labels(data.train.labels['labels'])
  return Setup(model, params, rules, pre, data, adapter, scale)


def with_raw_head(params: dict, scale: TargetScale) -> dict:
  """Trainable or full params with the head moved from the standardised to the raw scale."""
  if 'head' not in params or scale == TargetScale():
    return params
  return {**params, 'head': scale.fold(params['head'])}


def length_buckets(config, data) -> tuple[tuple[int, ...], dict[str, tuple[int, ...]]]:
  """Padded lengths for training and for each eval split: at most data.num_buckets each.

  data.fit_buckets picks them from the data (batching.fit_boundaries: least padding plus
  data.bucket_shape_cost positions per compiled shape); otherwise they are geometric up to
  max_seq_length.
  """
  d = config.data
  geometric = batching.bucket_boundaries(d.max_seq_length, d.num_buckets,
                                         min_len=d.min_bucket_length)
  if not d.fit_buckets:
    return geometric, {name: geometric for name in data.evals}
  fit = lambda maxima, rows: batching.fit_boundaries(
      maxima, d.num_buckets, max_len=d.max_seq_length, shape_cost=d.bucket_shape_cost / rows)
  train = fit(batching.train_batch_maxima(data.train.input_ids, config.batch_size, config.seed),
              config.batch_size)
  evals = {name: fit(batching.eval_batch_maxima(split.input_ids, config.eval_batch_size),
                     config.eval_batch_size)
           if len(split) else geometric for name, split in data.evals.items()}
  return train, evals


def num_steps_for(config, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, int(math.ceil(config.num_epochs * steps_per_epoch)))


def check_workdir(workdir: pathlib.Path, config_json: str, overwrite: bool):
  """Refuses to mix two different runs in one workdir (that would corrupt both)."""
  path = workdir / 'config.json'
  if not path.exists() or overwrite:
    return
  old, new = _flat(json.loads(path.read_text())), _flat(json.loads(config_json))
  # Keys on one side only are schema changes between versions, not a different run.
  diff = sorted(k for k in set(old) & set(new) if old[k] != new[k])
  if diff:
    raise UsageError(f'{workdir} holds a run with a different config (differs in: '
                     f'{", ".join(diff[:5])}); use a new --workdir, or pass --overwrite to '
                     'start that run over')


def clear_run(workdir: pathlib.Path):
  """--overwrite: the user asked to start over, so the old run's state goes."""
  import shutil
  for name in ('checkpoints', 'tensorboard', 'adapter'):
    shutil.rmtree(workdir / name, ignore_errors=True)
  for pattern in ('metrics.jsonl', 'predictions*.json*', 'config.json'):
    for f in workdir.glob(pattern):
      f.unlink()


def _flat(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = v
  return out


class _Preempted:
  """SIGTERM (a pre-emption notice) asks the loop to checkpoint and exit cleanly."""

  def __init__(self):
    self.flag = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _handle(self, *_):
    self.flag = True

  def __exit__(self, *_):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def train_and_evaluate(config, workdir, overwrite: bool = False) -> dict:
  """Trains, evaluates and exports; returns the final eval metrics."""
  process_start = time.perf_counter()
  validate(config)
  workdir = pathlib.Path(workdir).absolute()
  is_main = jax.process_index() == 0
  config_json = config.to_json_best_effort(indent=2, sort_keys=True)
  if workdir.exists():
    check_workdir(workdir, config_json, overwrite)
    if overwrite and jax.process_index() == 0:
      clear_run(workdir)
  parallel.check_batch_size(config.batch_size)
  parallel.check_batch_size(config.eval_batch_size, 'eval_batch_size')
  workdir.mkdir(parents=True, exist_ok=True)

  setup = build(config, workdir)
  data, rules = setup.data, setup.rules
  train_params, frozen_params = trainable_lib.split(setup.params, rules)
  counts = trainable_lib.summary(setup.params, rules)

  train_labels = _label_array(data.train)
  if data.head == 'regression':
    train_labels = setup.target_scale.standardize(train_labels)
  steps_per_epoch = batching.num_train_batches(len(data.train), config.batch_size)
  if steps_per_epoch == 0:
    raise UsageError(f'the training split has {len(data.train)} examples, fewer than one batch '
                     f'of {config.batch_size}; lower batch_size or add data')
  total_steps = num_steps_for(config, steps_per_epoch)
  train_bounds, eval_bounds = length_buckets(config, data)

  from adapter_tuning.training.optim import make_optimizer
  tx = make_optimizer(config, total_steps)
  mesh = parallel.make_mesh()
  rep, shard = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  frozen_dev = parallel.put_replicated(frozen_params, mesh)
  state = jax.jit(lambda p: steps.init_state(p, tx, config.seed), out_shardings=rep)(
      parallel.put_replicated(train_params, mesh))
  pool = precompile.compile_pool()
  train_step = precompile.AheadOfTime(jax.jit(
      steps.make_train_step(setup.model, tx, data.head), in_shardings=(rep, rep, shard),
      out_shardings=(rep, rep), donate_argnums=(0,)), pool)
  eval_step = precompile.AheadOfTime(jax.jit(
      steps.make_eval_step(setup.model, data.head), in_shardings=(rep, shard),
      out_shardings=shard), pool)

  def compile_ahead(batch, epoch, start_batch):
    """Starts compiling every train and eval batch shape of the run (precompile.py)."""
    state_spec, frozen_spec = precompile.abstract(state), precompile.abstract(frozen_dev)
    for length in batching.train_lengths(data.train.input_ids, config.batch_size,
                                         seed=config.seed, epoch=epoch, boundaries=train_bounds,
                                         start_batch=start_batch):
      train_step.prepare(state_spec, frozen_spec, precompile.with_length(batch, length))
    params_spec = precompile.abstract(trainable_lib.merge(state['params'], frozen_dev))
    inputs = {k: batch[k] for k in ('input_ids', 'attention_mask', 'token_type_ids')}
    for name, split in data.evals.items():
      for length in batching.eval_lengths(split.input_ids, config.eval_batch_size,
                                          eval_bounds[name]):
        eval_step.prepare(params_spec,
                          precompile.with_length(inputs, length, config.eval_batch_size))

  if is_main:
    (workdir / 'config.json').write_text(config_json)
  reporter = Reporter(workdir, is_main, total_steps, config.batch_size, config.progress_bar)
  reporter.log(trainable_lib.format_summary(counts))
  reporter.log(f'task {data.task}: {len(data.train)} training rows, '
               + ', '.join(f'{k} {len(v)}' for k, v in data.evals.items())
               + f'; {total_steps} steps of {config.batch_size} on {jax.device_count()} '
               f'{jax.devices()[0].platform} device(s)')
  for k, v in data.report.items():
    reporter.log(f'data: {k} = {v}')
  reporter.log(f'length buckets: train {train_bounds}; '
               + '; '.join(f'{k} {v}' for k, v in eval_bounds.items()))

  ckpt = Checkpointer(workdir / 'checkpoints', config.keep_checkpoints)
  base_identity = setup.pretrained.identity
  restored = ckpt.restore(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state))
  step = 0
  if restored is not None:
    state, meta, step = restored
    if meta.get('base_sha256') != base_identity['sha256']:
      raise UsageError(f'the checkpoints in {workdir} were made with another base model; '
                       'use a new --workdir for this checkpoint')
    reporter.log(f'resumed from the checkpoint at step {step}')

  def evaluate(params_dev, at_step):
    full = with_raw_head(trainable_lib.merge(params_dev, frozen_dev), setup.target_scale)
    results = evaluation.evaluate_all(eval_step, full, data, config, eval_bounds, shard,
                                         setup.pretrained.tokenizer.pad_id)
    reporter.write(at_step, results.metrics)
    for warning in results.warnings:
      reporter.log(f'warning: {warning}')
    reporter.log(f'eval at step {at_step}: ' + ', '.join(
        f'{k.split("/", 1)[1]} {v:.4f}' for k, v in results.metrics.items()))
    if is_main:
      results.write_predictions(workdir)
    return results.metrics

  def save(at_step, force=False):
    ckpt.save(at_step, state, {'step': at_step, 'base_sha256': base_identity['sha256'],
                               'total_steps': total_steps}, force=force)

  start_time = time.perf_counter()
  setup_seconds = start_time - process_start
  last_metrics, window_losses, final_metrics = None, [], {}
  reporter.rate(step)
  with _Preempted() as preempted:
    while step < total_steps:
      epoch, start_batch = divmod(step, steps_per_epoch)
      for local in batching.train_batches(
          data.train.input_ids, data.train.token_type_ids, train_labels, config.batch_size,
          seed=config.seed, epoch=epoch, boundaries=train_bounds,
          process_index=jax.process_index(), process_count=jax.process_count(),
          start_batch=start_batch, pad_id=setup.pretrained.tokenizer.pad_id):
        batch = parallel.to_global(_with_label_keys(local, data.head), shard)
        if config.compile_ahead and not train_step.prepared:
          compile_ahead(batch, epoch, start_batch)
        state, metrics = train_step(state, frozen_dev, batch)
        if last_metrics is not None:  # fetch one step late: the device keeps running
          window_losses.append(_check_finite(last_metrics, step, ckpt))
        last_metrics = metrics
        step += 1
        if step % config.log_every_steps == 0 or step == total_steps:
          window_losses.append(_check_finite(last_metrics, step, ckpt))
          last_metrics = None
          rate = reporter.rate(step)
          loss = float(np.mean(window_losses))
          reporter.write(step, {'train/loss': loss, 'train/learning_rate':
                                float(_lr(config, total_steps, step)), **rate})
          reporter.progress(step, loss, rate.get('train/steps_per_s'))
          window_losses = []
        do_eval = (config.eval_every_steps and step % config.eval_every_steps == 0
                   and step < total_steps)
        do_save = step % config.checkpoint_every_steps == 0 or preempted.flag
        if (do_eval or do_save) and last_metrics is not None:
          # Never evaluate or checkpoint a state whose last step has not been checked.
          window_losses.append(_check_finite(last_metrics, step, ckpt))
          last_metrics = None
        if do_eval:
          evaluate(state['params'], step)
        if do_save:
          save(step)
        if preempted.flag:
          pool.shutdown(cancel_futures=True)
          ckpt.close()
          reporter.log(f'received SIGTERM: saved a checkpoint at step {step}; rerun the same '
                       'command to resume')
          reporter.close()
          return {}
        if step >= total_steps:
          break
  if last_metrics is not None:
    _check_finite(last_metrics, step, ckpt)
  train_seconds = time.perf_counter() - start_time
  if ckpt.latest_step() != step:
    save(step, force=True)
  eval_start = time.perf_counter()
  final_metrics = evaluate(state['params'], step)
  eval_seconds = time.perf_counter() - eval_start
  pool.shutdown(cancel_futures=True)
  ckpt.close()

  trained = with_raw_head(parallel.to_host(state['params']), setup.target_scale)
  if is_main:
    artifact.save(workdir / 'adapter', trained, {
        'task': data.task, 'head': data.head, 'label_names': list(data.label_names),
        'num_outputs': data.num_outputs, 'metric_names': list(data.metric_names),
        'pooling': config.model.head.pooling,
        'target_scale': dataclasses.asdict(setup.target_scale),  # already folded into head/*
        'adapter': dataclasses.asdict(setup.adapter) if setup.adapter else None,
        'trainable_rules': [list(r) for r in rules],
        'base': {**base_identity, 'path': str(setup.pretrained.directory)},
        'max_seq_length': config.data.max_seq_length,
        'final_metrics': final_metrics, 'step': step,
        'params': {k: v for k, v in counts.items()}})
  size_kb = sum(f.stat().st_size for f in (workdir / 'adapter').glob('*')) / 1024
  reporter.log(f'done: {step} steps in {train_seconds:.1f}s; trained '
               f'{counts["trainable"]:,} of {counts["total"]:,} parameters '
               f'({counts["trainable_pct_of_base"]:.2f}% of the base); adapter artifact '
               f'({size_kb:.0f} KiB) in {workdir / "adapter"}')
  reporter.log(f'time: setup {setup_seconds:.1f}s (checkpoint, data, tokenising), train loop '
               f'{train_seconds:.1f}s (compilation included), final evaluation {eval_seconds:.1f}s; '
               f'{train_step.compiled_ahead + eval_step.compiled_ahead} step shapes compiled '
               f'ahead, {train_step.misses + eval_step.misses} batches not')
  reporter.write(step, {'train/seconds': train_seconds, 'time/setup_seconds': setup_seconds,
                        'time/final_eval_seconds': eval_seconds})
  reporter.close()
  return final_metrics


def _lr(config, total_steps, step):
  from adapter_tuning.training.optim import learning_rate_schedule
  return learning_rate_schedule(config.learning_rate, total_steps, config.warmup_ratio)(step)


def _label_array(split):
  if 'labels' in split.labels:
    return split.labels['labels']
  return np.stack([split.labels['start_positions'], split.labels['end_positions']], axis=1)


def _with_label_keys(batch: dict, head: str) -> dict:
  if head != 'span':
    return batch
  batch = dict(batch)
  labels = batch.pop('labels')
  batch['start_positions'], batch['end_positions'] = labels[:, 0], labels[:, 1]
  return batch


def _check_finite(metrics, step: int, ckpt: Checkpointer) -> float:
  """Fetches a step's metrics (`step` = its 1-based number); stops the run if not finite."""
  host = jax.device_get(metrics)
  if not bool(host['finite']):
    ckpt.wait()
    last = ckpt.latest_step()
    kept = f'the last good checkpoint (step {last}) is kept' if last is not None else \
        'no checkpoint was written yet'
    raise RunFailure(f'non-finite loss or gradient at step {step} (loss {host["loss"]}, '
                     f'grad norm {host["grad_norm"]}); the step was not applied and {kept}; '
                     'lower learning_rate or check the data')
  return float(host['loss'])
