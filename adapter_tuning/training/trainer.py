"""`train_and_evaluate(config, workdir)`: a run as a sequence of named phases.

  1. `workdir.prepare`  - one run per folder; --overwrite clears it
  2. `build.build`      - base + adapters, task data, head, trainable rules
  3. `start_run`        - step plan, frozen base on the devices, jitted steps, logs
  4. `init_or_restore`  - fresh optimizer state or the newest readable checkpoint
  5. `train_loop`       - steps until the end or SIGTERM (checkpoint, then exit 0)
  6. `finish`           - last checkpoint, final evaluation, the adapter artifact

The loop is deliberately plain: one jitted train step over the trainable subtree, metrics
fetched one step late (`LateMetrics`: the host never stalls the device, and fake CPU devices
never pile up collectives), NaN/Inf stop the run, checkpoints every N steps and at the end,
evaluation with the task's official metrics. `Run.close` runs on every exit path.
"""

from __future__ import annotations

import dataclasses
import pathlib
import signal
import time

import jax
import numpy as np

from adapter_tuning import fileio, peft
from adapter_tuning.config import validate
from adapter_tuning.data import batching, mlm, packing
from adapter_tuning.errors import RunFailure, UsageError
from adapter_tuning.interop import artifact
from adapter_tuning.models.heads import head_kind
from adapter_tuning.training import evaluation, parallel, precompile, steps
from adapter_tuning.training import trainable as trainable_lib
from adapter_tuning.training import workdir as workdir_lib
from adapter_tuning.training.build import Setup, build, length_buckets, num_steps_for, with_raw_head
from adapter_tuning.training.checkpointing import Checkpointer
from adapter_tuning.training.reporting import Reporter
from adapter_tuning.training.selection import BEST_DIR, BestTracker


class Preempted:
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


class LateMetrics:
  """Each step's metrics are fetched one step late, so the host never waits on the device.

  `add` records the step just dispatched and fetches the one before (by then the device is
  on the next step; fake CPU devices never pile up collectives). `flush` fetches the pending
  one now: before evaluating, checkpointing or logging a state. Every fetch checks the loss
  and gradient norm are finite (`check_finite`).
  """

  def __init__(self, ckpt: Checkpointer):
    self.ckpt = ckpt
    self.pending = None  # (metrics on device, 1-based step)
    self.losses: list[float] = []

  def add(self, metrics, step: int):
    self.flush()
    self.pending = (metrics, step)

  def flush(self):
    if self.pending is not None:
      metrics, step = self.pending
      self.pending = None
      self.losses.append(check_finite(metrics, step, self.ckpt))

  def take_mean_loss(self) -> float:
    self.flush()
    loss, self.losses = float(np.mean(self.losses)), []
    return loss


@dataclasses.dataclass
class Run:
  """What one training run holds between its phases (built by `start_run`)."""

  config: object
  workdir: pathlib.Path
  setup: Setup
  plan: dict  # steps_per_epoch, total_steps, train/eval bucket bounds, train labels
  mesh: object
  frozen: object  # the frozen params, on the devices
  tx: object
  train_step: precompile.AheadOfTime
  eval_step: precompile.AheadOfTime
  pool: object
  ckpt: Checkpointer
  reporter: Reporter
  tracker: BestTracker  # best-on-validation artifact and early stopping (selection.py)
  state_shardings: object = None  # of the train state on `mesh` (parallel.state_shardings)

  @property
  def total_steps(self) -> int:
    return self.plan['total_steps']

  def batches(self, epoch: int, start_batch: int):
    """The global train batches of one epoch from `start_batch` on, this process's rows."""
    c, train = self.config, self.setup.data.train
    kind = head_kind(self.setup.data.head)
    pad_id, layout = self.setup.pretrained.tokenizer.pad_id, self.plan['train_bounds']
    if isinstance(layout, packing.Packed):
      source = packing.train_batches(
          train.input_ids, train.token_type_ids, self.plan['train_labels'], c.batch_size,
          seed=c.seed, epoch=epoch, packed=layout, start_batch=start_batch, pad_id=pad_id)
    else:
      source = batching.train_batches(
          train.input_ids, train.token_type_ids, self.plan['train_labels'], c.batch_size,
          seed=c.seed, epoch=epoch, boundaries=layout, process_index=jax.process_index(),
          process_count=jax.process_count(), start_batch=start_batch, pad_id=pad_id)
    masking = self.setup.data.masking  # data.task=mlm: BERT's masks, by (seed, epoch, example)
    for local in source:
      if masking is not None:
        local = masking.train(local, c.seed, epoch)
      yield parallel.to_global(kind.unstack_labels(local), parallel.batch_sharded(self.mesh))

  def at_length(self, batch, length: int, rows: int | None = None):
    """The abstract `batch` padded to `length` (`precompile.with_length`), with an MLM
    batch's prediction slots sized for that length."""
    spec = precompile.with_length(batch, length, rows)
    masking = self.setup.data.masking
    return spec if masking is None else masking.spec(spec, length)

  def compile_ahead(self, state, batch, epoch: int, start_batch: int):
    """Starts compiling every train and eval batch shape of the run (precompile.py)."""
    c, data = self.config, self.setup.data
    state_spec, frozen_spec = precompile.abstract(state), precompile.abstract(self.frozen)
    params_spec = precompile.abstract(trainable_lib.merge(state['params'], self.frozen))
    if isinstance(self.plan['train_bounds'], packing.Packed):
      return self._compile_packed(state_spec, frozen_spec, params_spec, batch, epoch,
                                  start_batch)
    for length in batching.train_lengths(data.train.input_ids, c.batch_size, seed=c.seed,
                                         epoch=epoch, boundaries=self.plan['train_bounds'],
                                         start_batch=start_batch):
      self.train_step.prepare(state_spec, frozen_spec, self.at_length(batch, length))
    inputs = {k: batch[k] for k in ('input_ids', 'attention_mask', 'token_type_ids')
              + mlm.SLOT_KEYS if k in batch}
    for name, split in data.evals.items():
      for length in batching.eval_lengths(split.input_ids, c.eval_batch_size,
                                          self.plan['eval_bounds'][name]):
        self.eval_step.prepare(params_spec, self.at_length(inputs, length, c.eval_batch_size))

  def _compile_packed(self, state_spec, frozen_spec, params_spec, batch, epoch, start_batch):
    """`compile_ahead` for packed batches: one shape per row count in use."""
    c, data = self.config, self.setup.data
    batch_spec = precompile.abstract(batch)
    for rows in packing.train_rows(data.train.input_ids, c.batch_size, c.seed, epoch,
                                   self.plan['train_bounds'], start_batch):
      self.train_step.prepare(state_spec, frozen_spec, packing.with_rows(batch_spec, rows))
    inputs = {k: v for k, v in batch_spec.items() if k != 'labels'}
    for name, split in data.evals.items():
      for rows in packing.eval_rows(split.input_ids, c.eval_batch_size,
                                    self.plan['eval_bounds'][name]):
        self.eval_step.prepare(params_spec,
                               packing.with_rows(inputs, rows, examples=c.eval_batch_size))

  def evaluate(self, params_dev, at_step: int) -> dict:
    """Every eval split with the official metrics; writes metrics, warnings, predictions."""
    setup = self.setup
    full = with_raw_head(trainable_lib.merge(params_dev, self.frozen), setup.target_scale)
    results = evaluation.evaluate_all(self.eval_step, full, setup.data, self.config,
                                      self.plan['eval_bounds'], parallel.batch_sharded(self.mesh),
                                      setup.pretrained.tokenizer.pad_id)
    self.reporter.write(at_step, results.metrics)
    for warning in results.warnings:
      self.reporter.log(f'warning: {warning}')
    self.reporter.log(f'eval at step {at_step}: ' + ', '.join(
        f'{k.split("/", 1)[1]} {v:.4f}' for k, v in results.metrics.items()))
    if jax.process_index() == 0:
      results.write_predictions(self.workdir)
    return results.metrics

  def select(self, params_dev, metrics: dict, at_step: int) -> bool:
    """Scores one evaluation; writes adapter_best/ on a new best. True: stop early."""
    if not self.config.eval_every_steps:
      return False
    if self.tracker.update(metrics, at_step):
      self.write_artifact(params_dev, metrics, at_step, BEST_DIR)
      self.reporter.log(f'new best {self.tracker.metric} {self.tracker.score:.4f} at step '
                        f'{at_step}: {self.workdir / BEST_DIR}')
    return self.tracker.should_stop

  def write_artifact(self, params_dev, metrics: dict, at_step: int, name: str = 'adapter'):
    trained = with_raw_head(parallel.to_host(params_dev), self.setup.target_scale)
    method, trained = peft.for_artifact(self.setup.adapter, trained)
    if jax.process_index() == 0:
      artifact.save(self.workdir / name, trained,
                    artifact_meta(self.config, self.setup, metrics, at_step, method))

  def save(self, state, at_step: int, force: bool = False):
    self.ckpt.save(at_step, state, {'step': at_step, 'total_steps': self.total_steps,
                                    'base_sha256': self.setup.pretrained.identity['sha256'],
                                    'selection': self.tracker.state()},
                   force=force)

  def close(self):
    """Shutdown, on every exit path: compile workers, pending checkpoint writes, log files."""
    self.pool.shutdown(cancel_futures=True)
    self.ckpt.close()
    self.reporter.close()


def train_and_evaluate(config, workdir, overwrite: bool = False) -> dict:
  """Trains, evaluates and exports; returns the final eval metrics ({} when pre-empted)."""
  clock = {'process_start': time.perf_counter()}
  validate(config)
  parallel.check_batch_size(config.batch_size)
  parallel.check_batch_size(config.eval_batch_size, 'eval_batch_size')
  mesh = parallel.make_mesh(config.mesh.fsdp)
  with workdir_lib.locked(workdir):
    workdir, config_json = workdir_lib.prepare(config, workdir, overwrite)
    setup = build(config, workdir, mesh=mesh)  # an fsdp mesh: the base is born sharded
    run = start_run(config, workdir, setup, config_json, mesh)
    try:
      state, step = init_or_restore(run)
      clock['train_start'] = time.perf_counter()
      state, step, preempted = train_loop(run, state, step)
      clock['train_end'] = time.perf_counter()
      if preempted:
        run.reporter.log(f'received SIGTERM: saved a checkpoint at step {step}; rerun the '
                         'same command to resume')
        return {}
      return finish(run, state, step, clock)
    finally:
      run.close()


def plan_steps(config, setup: Setup) -> dict:
  """How long the run is and how its batches are shaped; the (standardised) train labels."""
  data = setup.data
  kind = head_kind(data.head)
  labels = kind.stack_labels(data.train.labels)
  if kind.standardized_targets:
    labels = setup.target_scale.standardize(labels)
  steps_per_epoch = batching.num_train_batches(len(data.train), config.batch_size)
  if steps_per_epoch == 0:
    raise UsageError(f'the training split has {len(data.train)} examples, fewer than one batch '
                     f'of {config.batch_size}; lower batch_size or add data')
  train_bounds, eval_bounds = length_buckets(config, data)
  return {'steps_per_epoch': steps_per_epoch, 'total_steps': num_steps_for(config, steps_per_epoch),
          'train_bounds': train_bounds, 'eval_bounds': eval_bounds, 'train_labels': labels}


def start_run(config, workdir: pathlib.Path, setup: Setup, config_json: str,
              mesh=None) -> Run:
  """Plans the steps, puts the frozen base on the devices, jits the steps, opens the logs.

  Shardings (training/parallel.py): the frozen base split along the mesh's fsdp axis (if
  any), the train state replicated but for leaves as large as base matrices, batches over
  every device; XLA gathers a split matrix where the step uses it."""
  from adapter_tuning.training.optim import make_optimizer
  plan = plan_steps(config, setup)
  tx = make_optimizer(config, plan['total_steps'])
  mesh = mesh or parallel.make_mesh(config.mesh.fsdp)
  rep, shard = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  train_params, frozen_params = trainable_lib.split(setup.params, setup.rules)
  state_sh = parallel.state_shardings(
      jax.eval_shape(lambda p: steps.init_state(p, tx, config.seed), train_params), mesh)
  frozen_sh = parallel.frozen_shardings(frozen_params, mesh)
  pool = precompile.compile_pool()
  head = setup.data.head
  train_step = precompile.AheadOfTime(jax.jit(
      steps.make_train_step(setup.model, tx, head), in_shardings=(state_sh, frozen_sh, shard),
      out_shardings=(state_sh, rep), donate_argnums=(0,)), pool)
  eval_step = precompile.AheadOfTime(jax.jit(
      steps.make_eval_step(setup.model, head),
      in_shardings=(trainable_lib.merge(state_sh['params'], frozen_sh), shard),
      out_shardings=shard), pool)
  is_main = jax.process_index() == 0
  if is_main:
    fileio.write_atomic(workdir / 'config.json', config_json)
  reporter = Reporter(workdir, is_main, plan['total_steps'], config.batch_size,
                      config.progress_bar)
  run = Run(config, workdir, setup, plan, mesh, parallel.put(frozen_params, frozen_sh),
            tx, train_step, eval_step, pool,
            Checkpointer(workdir / 'checkpoints', config.keep_checkpoints), reporter,
            BestTracker(f'eval/{setup.data.metric_names[0]}', config.early_stopping_patience),
            state_sh)
  _log_header(run)
  return run


def _log_header(run: Run):
  data, plan, c = run.setup.data, run.plan, run.config
  run.reporter.log(trainable_lib.format_summary(trainable_lib.summary(run.setup.params,
                                                                     run.setup.rules)))
  run.reporter.log(f'task {data.task}: {len(data.train)} training rows, '
                   + ', '.join(f'{k} {len(v)}' for k, v in data.evals.items())
                   + f'; {plan["total_steps"]} steps of {c.batch_size} on {jax.device_count()} '
                   f'{jax.devices()[0].platform} device(s)')
  for k, v in data.report.items():
    run.reporter.log(f'data: {k} = {v}')
  if isinstance(plan['train_bounds'], packing.Packed):
    run.reporter.log(packing.describe(data.train.input_ids, c.batch_size, c.seed,
                                      plan['train_bounds'], plan['eval_bounds']))
  else:
    run.reporter.log(f'length buckets: train {plan["train_bounds"]}; '
                     + '; '.join(f'{k} {v}' for k, v in plan['eval_bounds'].items()))


def init_or_restore(run: Run):
  """The optimizer state on the devices: fresh, or the newest readable checkpoint's
  (restored straight into this run's shardings, whatever mesh saved it)."""
  sh = run.state_shardings
  train_params, _ = trainable_lib.split(run.setup.params, run.setup.rules)
  state = jax.jit(lambda p: steps.init_state(p, run.tx, run.config.seed), out_shardings=sh)(
      parallel.put(train_params, sh['params']))
  restored = run.ckpt.restore(parallel.abstract(state, sh))
  if restored is None:
    return state, 0
  state, meta, step = restored
  if meta.get('base_sha256') != run.setup.pretrained.identity['sha256']:
    raise UsageError(f'the checkpoints in {run.workdir} were made with another base model; '
                     'use a new --workdir for this checkpoint')
  run.tracker.restore(meta.get('selection'))
  run.reporter.log(f'resumed from the checkpoint at step {step}')
  return state, step


def train_loop(run: Run, state, step: int):
  """Steps until total_steps or SIGTERM: (state, step, pre-empted?)."""
  c, late = run.config, LateMetrics(run.ckpt)
  run.reporter.rate(step)
  with Preempted() as preempted:
    while step < run.total_steps and not run.tracker.should_stop:
      epoch, start_batch = divmod(step, run.plan['steps_per_epoch'])
      for batch in run.batches(epoch, start_batch):
        if c.compile_ahead and not run.train_step.prepared:
          run.compile_ahead(state, batch, epoch, start_batch)
        state, metrics = run.train_step(state, run.frozen, batch)
        step += 1
        late.add(metrics, step)
        if step % c.log_every_steps == 0 or step == run.total_steps:
          _log_train(run, late.take_mean_loss(), step)
        do_eval = c.eval_every_steps and step % c.eval_every_steps == 0 and step < run.total_steps
        do_save = step % c.checkpoint_every_steps == 0 or preempted.flag
        if do_eval or do_save:
          late.flush()  # never evaluate or checkpoint a state whose last step is unchecked
        if do_eval and run.select(state['params'], run.evaluate(state['params'], step), step):
          run.reporter.log(f'early stopping at step {step}: no better {run.tracker.metric} in '
                           f'{run.tracker.bad_evals} evaluations (best '
                           f'{run.tracker.score:.4f} at step {run.tracker.step})')
          run.save(state, step)
          return state, step, False
        if do_save:
          run.save(state, step)
        if preempted.flag:
          return state, step, True
        if step >= run.total_steps:
          break
  late.flush()
  return state, step, False


def _log_train(run: Run, loss: float, step: int):
  rate = run.reporter.rate(step)
  run.reporter.write(step, {'train/loss': loss, 'train/learning_rate':
                            float(_lr(run.config, run.total_steps, step)), **rate})
  run.reporter.progress(step, loss, rate.get('train/steps_per_s'))


def finish(run: Run, state, step: int, clock: dict) -> dict:
  """The last checkpoint, the final evaluation, the adapter artifact and the summary lines."""
  if run.ckpt.latest_step() != step:
    run.save(state, step, force=True)
  eval_start = time.perf_counter()
  final_metrics = run.evaluate(state['params'], step)
  clock['eval_seconds'] = time.perf_counter() - eval_start
  run.pool.shutdown(cancel_futures=True)
  run.ckpt.wait()
  run.select(state['params'], final_metrics, step)
  run.write_artifact(state['params'], final_metrics, step)
  _log_summary(run, step, clock)
  return final_metrics


def artifact_meta(config, setup: Setup, final_metrics: dict, step: int, method) -> dict:
  """What adapter/config.json records; `method`: the PEFT config as the artifact stores it
  (`peft.for_artifact`)."""
  data = setup.data
  return {
      'task': data.task, 'head': data.head, 'label_names': list(data.label_names),
      'num_outputs': data.num_outputs, 'metric_names': list(data.metric_names),
      'pooling': config.model.head.pooling,
      'target_scale': dataclasses.asdict(setup.target_scale),  # already folded into head/*
      'peft': peft.to_meta(method),
      'adapter': peft.to_meta(method).get('bottleneck'),  # as before methods combined
      'trainable_rules': [list(r) for r in setup.rules],
      'base': {**setup.pretrained.identity, 'path': str(setup.pretrained.directory)},
      'max_seq_length': config.data.max_seq_length,
      'final_metrics': final_metrics, 'step': step,
      'params': trainable_lib.summary(setup.params, setup.rules)}


def _log_summary(run: Run, step: int, clock: dict):
  counts = trainable_lib.summary(run.setup.params, run.setup.rules)
  setup_s = clock['train_start'] - clock['process_start']
  train_s, eval_s = clock['train_end'] - clock['train_start'], clock['eval_seconds']
  size_kb = sum(f.stat().st_size for f in (run.workdir / 'adapter').glob('*')) / 1024
  log, ts, es = run.reporter.log, run.train_step, run.eval_step
  log(f'done: {step} steps in {train_s:.1f}s; trained {counts["trainable"]:,} of '
      f'{counts["total"]:,} parameters ({counts["trainable_pct_of_base"]:.2f}% of the base); '
      f'adapter artifact ({size_kb:.0f} KiB) in {run.workdir / "adapter"}')
  log(f'time: setup {setup_s:.1f}s (checkpoint, data, tokenising), train loop {train_s:.1f}s '
      f'(compilation included), final evaluation {eval_s:.1f}s; '
      f'{ts.compiled_ahead + es.compiled_ahead} step shapes compiled ahead, '
      f'{ts.misses + es.misses} batches not')
  run.reporter.write(step, {'train/seconds': train_s, 'time/setup_seconds': setup_s,
                            'time/final_eval_seconds': eval_s})


def _lr(config, total_steps, step):
  from adapter_tuning.training.optim import learning_rate_schedule
  return learning_rate_schedule(config.learning_rate, total_steps, config.warmup_ratio)(step)


def check_finite(metrics, step: int, ckpt: Checkpointer) -> float:
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
