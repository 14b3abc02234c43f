"""The config schema: every key with its default and one line on what it does, and its checks.

Config files (configs/*.py) import `get_config()` from here and override what differs. Any
key may be overridden on the command line: `--config.learning_rate=1e-3`. Unknown keys and
values of the wrong type are errors (ml_collections enforces both on overrides; `validate`
checks values, combinations, and keys set in config files), one line each with the fix.
"""

from __future__ import annotations

import itertools

import ml_collections

from adapter_tuning.errors import UsageError
from adapter_tuning.models.heads import POOLINGS

# The paper's GLUE search space (Houlsby et al. 2019, section 3.2).
LEARNING_RATES = (3e-5, 3e-4, 3e-3)
EPOCHS = (3.0, 20.0)
ADAPTER_SIZES = (8, 64, 256)


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = _model_keys()

  # What trains (training/trainable.py): adapters (PEFT params + all layer norms + head, the
  # paper) | peft (PEFT params + head, LayerNorms frozen: AdapterHub's and peft's recipe) |
  # bitfit (every bias + head) | full | head | top:K,
  # or (regex over '/'-joined param paths, 'train' | 'freeze') rules, first match wins: a tuple
  # in a config file, 'REGEX=train;REGEX=freeze;...' on the command line.
  c.trainable = ml_collections.FieldReference('adapters', field_type=object)

  c.data = _data_keys()

  # Devices (training/parallel.py). Not part of a run's identity: a run checkpointed under one
  # mesh resumes under another (training/workdir.py).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.fsdp = 1                    # devices per fsdp group: the frozen base's matrices are
                                     # split over them (1 = every device holds the whole base)

  c.batch_size = 32                  # global batch (all devices, all processes)
  c.eval_batch_size = 64             # global eval batch
  c.learning_rate = 3e-4             # peak learning rate (paper grid: 3e-5, 3e-4, 3e-3)
  c.num_train_steps = 0              # total steps; 0 = derive from num_epochs
  c.num_epochs = 3.0                 # epochs when num_train_steps = 0 (paper grid: 3, 20)
  c.warmup_ratio = 0.1               # linear warm-up over this fraction of steps, then linear decay
  c.weight_decay = 0.01              # AdamW decoupled weight decay (not on LayerNorm or biases)
  c.adam_b1 = 0.9                    # Adam beta1
  c.adam_b2 = 0.999                  # Adam beta2
  c.adam_eps = 1e-6                  # Adam epsilon
  c.grad_clip_norm = 1.0             # global gradient-norm clip (0 = off)
  c.seed = 0                         # data order, dropout and adapter init

  c.early_stopping_patience = 0      # stop after N evaluations without a better main metric
                                     # (needs eval_every_steps; 0 = off); adapter_best/ keeps
                                     # the best-on-validation artifact either way
  c.log_every_steps = 50             # train metrics to metrics.jsonl / TensorBoard
  c.eval_every_steps = 0             # evaluate every N steps (0 = only at the end)
  c.checkpoint_every_steps = 500     # orbax checkpoint every N steps (and always at the end)
  c.keep_checkpoints = 2             # checkpoints kept on disk
  c.compile_ahead = True             # compile every batch shape of the run in background threads
                                     # at the first step (training/precompile.py); False = on first use
  c.progress_bar = True              # a progress bar on a terminal; plain log lines otherwise
  return c


def _model_keys() -> ml_collections.ConfigDict:
  """config.model: the base, its PEFT methods and the head."""
  m = ml_collections.ConfigDict()
  m.checkpoint = 'bert-base-uncased'  # HF checkpoint directory or hub name (needs network)
  m.dtype = 'float32'                 # compute dtype: float32 | bfloat16 (params stay fp32)
  # Rematerialise each layer in the backward pass (saves activation memory): none | full
  # (recompute everything) | dots_saveable (keep matmul outputs, recompute the rest) | another
  # jax.checkpoint_policies name; true/false = full/none.
  m.remat = ml_collections.FieldReference('none', field_type=object)
  m.scan_layers = False               # lax.scan over identical layers (modeling.Encoder.scan):
                                      # compiles slower; faster steps on BERT-base (BENCHMARKS.md)
  m.adapter = ml_collections.ConfigDict()
  m.adapter.size = 64                 # bottleneck width m (paper: 8, 64, 256)
  m.adapter.placement = 'houlsby'     # houlsby (2 per layer) | pfeiffer (FFN only) | parallel
                                      # (both, reading the sub-layer input) | parallel_ffn | none
  m.adapter.scaling = 1.0             # factor on the adapter output (scaled parallel: 4.0)
  m.adapter.init_scale = 1e-3         # truncated-normal std of adapter weights; 0 = exact identity
  m.adapter.activation = 'gelu'       # gelu (exact) | gelu_tanh | relu | swish | tanh
  m.adapter.layers = ml_collections.FieldReference(None, field_type=tuple)  # layer indices with adapters; None or () = all
  m.adapter.original_ln_before = False  # adapter reads LN(x + h), LN again after (AdapterHub SeqBnConfig default)
  m.adapter.drop_lowest = 0           # AdapterDrop (robust): each step drops the adapters of the
                                      # lowest k' ~ U{0..N} layers; 0 = off (training only)

  m.lora = ml_collections.ConfigDict()  # LoRA (peft/lora.py); combines with adapters
  m.lora.rank = 0                     # rank r of each update; 0 = LoRA off
  m.lora.alpha = 8.0                  # the update is scaled by alpha / rank
  m.lora.dropout = 0.0                # dropout on the LoRA input
  m.lora.targets = 'query,value'      # comma-separated: query,key,value,attention_output,
                                      # intermediate,output

  m.ia3 = ml_collections.ConfigDict()  # IA³ (peft/ia3.py); combines with the others
  m.ia3.targets = ''                  # '' = off; key,value,intermediate (the paper's), output

  m.prefix = ml_collections.ConfigDict()  # prefix tuning (peft/prefix.py)
  m.prefix.length = 0                 # P key/value prefix positions per layer; 0 = off
  m.prefix.bottleneck = 512           # width of the reparametrisation MLP; 0 = flat prefixes
  m.prefix.keep_mlp = False           # the artifact keeps the MLP, not the prefixes it computes

  m.fusion = ml_collections.ConfigDict()  # AdapterFusion (peft/fusion.py); runs alone
  m.fusion.adapters = ''              # comma-separated bottleneck-adapter artifact folders of
                                      # this base to fuse; '' = off (their weights stay frozen)
  m.fusion.dropout = -1.0             # dropout on the fusion scores; -1 = the base's attention
                                      # dropout (AdapterHub's default)
  m.fusion.regularization = 0.01      # strength of ||I - V||^2 on the value matrix (AdapterHub)

  m.stack = ml_collections.ConfigDict()  # stacking, MAD-X (peft/stack.py)
  m.stack.below = ''                  # a bottleneck-adapter artifact folder of this base to run,
                                      # frozen, below this run's model.adapter at every site;
                                      # '' = off
  m.head = ml_collections.ConfigDict()
  m.head.pooling = 'pooler'           # sentence vector of classification/regression heads:
                                      # pooler (tanh over [CLS], the paper) | cls ([CLS]
                                      # state) | mean (over tokens; sentence-transformers)
  m.head.standardize_targets = True   # regression: learn (y - mean) / std of the train
                                      # split, folded back into the head for eval/artifact
  return m


def _data_keys() -> ml_collections.ConfigDict:
  """config.data: the task, where it is read from, and how it is batched."""
  m = ml_collections.ConfigDict()
  m.task = 'glue/sst2'          # glue/<name> | squad | text (generic classification) | mlm
                                # (masked-LM language adapter on plain text) | demo
  m.source = 'tfds'             # tfds | glue_dir | squad_json | files | generated (demo)
  m.data_dir = ''               # glue_dir: GLUE-layout TSV folder; tfds: TFDS data_dir ('' = default)
  m.train_file = ''             # squad_json / files: training file (mlm: comma-separated
                                # .txt, one text per line, or CSV/TSV/JSONL with text_key)
  m.eval_file = ''              # squad_json / files: evaluation file (mlm: held-out text)
  m.tfds_name = ''              # task=text from TFDS: dataset name, e.g. imdb_reviews
  m.name = ''                   # task=text: the name adapters are known by ('' = TFDS name or data folder)
  m.text_key = 'text'           # task=text: column / feature with the text
  m.text_pair_key = ''          # task=text: optional second text column ('' = none)
  m.label_key = 'label'         # task=text: label column / feature
  m.max_seq_length = 128        # tokens per example after truncation (special tokens included)
  m.max_train_examples = 0      # use only the first N training examples (0 = all)
  m.max_eval_examples = 0       # use only the first N examples of each eval split (0 = all)
  m.num_buckets = 4             # static sequence-length buckets (fewer shapes = fewer compiles)
  m.min_bucket_length = 0       # shortest bucket; 0 = buckets double up to max_seq_length
  m.fit_buckets = True          # pick the num_buckets lengths from the data (least padding);
                                # false = geometric up to max_seq_length (min_bucket_length)
  m.bucket_shape_cost = 8192    # fit_buckets: padded token positions a further compiled shape
                                # must save (its compile time over the time of one padded
                                # position; ~8k on 2 CPU cores); 0 = always num_buckets
  m.packing = False             # pack several examples per row of max_seq_length (one
                                # process; heads with one output per example): the
                                # num_buckets row counts replace the length buckets
  m.mlm_probability = 0.15      # mlm: share of non-special tokens predicted (BERT: 0.15;
                                # of them 80% [MASK], 10% random, 10% unchanged)
  m.doc_stride = 128            # squad: stride between context windows
  m.max_query_length = 64       # squad: question tokens kept
  m.max_answer_length = 30      # squad: longest answer span considered at eval
  m.holdout_articles = 0.0      # squad_json with train_file == eval_file: fraction of articles held out for eval
  return m


def sweep():
  """No sweep by default; task configs define their own."""
  return []


def paper_grid(seeds=(0,)):
  """18 adapter runs per seed, plus full fine-tuning and top-k baselines at their usual lrs."""
  runs = []
  for lr, epochs, size, seed in itertools.product(LEARNING_RATES, EPOCHS, ADAPTER_SIZES, seeds):
    runs.append({'trainable': 'adapters', 'model.adapter.size': size, 'learning_rate': lr,
                 'num_epochs': epochs, 'seed': seed})
  for lr, seed in itertools.product((3e-5, 5e-5), seeds):
    runs.append({'trainable': 'full', 'model.adapter.placement': 'none', 'learning_rate': lr,
                 'num_epochs': 3.0, 'seed': seed})
  return runs


def _check_types(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict,
                 prefix: str = ''):
  for key in config.keys():
    name = f'{prefix}{key}'
    if key not in reference:
      raise UsageError(f'unknown config key {name!r}; see adapter_tuning/config.py for valid keys')
    value, ref = config[key], reference[key]
    if name == 'model.remat':  # a policy name, or true/false
      if not isinstance(value, (str, bool)):
        raise UsageError(f'config.model.remat must be none, full, dots_saveable or true/false, '
                         f'got {value!r}')
      continue
    if name == 'trainable':  # a preset name, 'REGEX=mode;...', or a list of (regex, mode)
      if not isinstance(value, (str, list, tuple)):
        raise UsageError(f'config.trainable must be a preset name or (regex, mode) rules, got '
                         f'{value!r}')
      continue
    if isinstance(ref, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise UsageError(f'config.{name} must be a group of keys, got {value!r}')
      _check_types(value, ref, name + '.')
    elif isinstance(ref, bool) and not isinstance(value, bool):
      raise UsageError(f'config.{name} must be true/false, got {value!r}')
    elif isinstance(ref, (int, float)) and not isinstance(ref, bool):
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f'config.{name} must be a number, got {value!r}')
      if isinstance(ref, int) and not isinstance(ref, bool) and isinstance(value, float) \
          and not value.is_integer():
        raise UsageError(f'config.{name} must be an integer, got {value!r}')
    elif isinstance(ref, str) and not isinstance(value, str):
      raise UsageError(f'config.{name} must be a string, got {value!r}')


def validate(config: ml_collections.ConfigDict):
  _check_types(config, get_config())
  a = config.model.adapter
  checks = [
      (a.placement == 'none' or a.size > 0,
       f'model.adapter.size must be > 0, got {a.size}; the paper uses 8, 64 or 256'),
      (config.learning_rate > 0, f'learning_rate must be > 0, got {config.learning_rate}'),
      (0 <= config.warmup_ratio <= 1, f'warmup_ratio must be in [0, 1], got {config.warmup_ratio}'),
      (config.weight_decay >= 0, f'weight_decay must be >= 0, got {config.weight_decay}'),
      (config.batch_size > 0, f'batch_size must be > 0, got {config.batch_size}'),
      (config.eval_batch_size > 0, f'eval_batch_size must be > 0, got {config.eval_batch_size}'),
      (config.num_train_steps >= 0, 'num_train_steps must be >= 0 (0 = use num_epochs)'),
      (config.num_train_steps > 0 or config.num_epochs > 0,
       'set num_train_steps > 0 or num_epochs > 0'),
      (config.data.max_seq_length >= 8,
       f'data.max_seq_length must be >= 8, got {config.data.max_seq_length}'),
      (config.data.num_buckets >= 1, 'data.num_buckets must be >= 1'),
      (config.data.bucket_shape_cost >= 0, 'data.bucket_shape_cost must be >= 0'),
      (config.log_every_steps > 0, 'log_every_steps must be > 0'),
      (config.eval_every_steps >= 0, 'eval_every_steps must be >= 0 (0 = only at the end)'),
      (config.checkpoint_every_steps > 0, 'checkpoint_every_steps must be > 0'),
      (config.model.dtype in ('float32', 'bfloat16'),
       f'model.dtype must be float32 or bfloat16, got {config.model.dtype!r}'),
      (config.model.head.pooling in POOLINGS,
       f'model.head.pooling must be one of {", ".join(POOLINGS)}, got '
       f'{config.model.head.pooling!r}'),
      (config.grad_clip_norm >= 0, 'grad_clip_norm must be >= 0 (0 = off)'),
      (config.early_stopping_patience >= 0, 'early_stopping_patience must be >= 0 (0 = off)'),
      (config.early_stopping_patience == 0 or config.eval_every_steps > 0,
       'early_stopping_patience needs evaluations during training: set eval_every_steps'),
      (config.mesh.fsdp >= 1, f'mesh.fsdp must be >= 1, got {config.mesh.fsdp}'),
      (config.model.lora.rank >= 0,
       f'model.lora.rank must be >= 0 (0 = off), got {config.model.lora.rank}'),
  ]
  for ok, message in checks:
    if not ok:
      raise UsageError(message)
  from adapter_tuning.models.remat import remat_policy
  remat_policy(config.model.remat)  # an unknown policy name is one line here
  from adapter_tuning import peft
  peft.from_run_config(config)  # each method checks its own keys (one line, before loading)
  _check_task(config.data)


def _check_task(data):
  """Fails on a bad task/source before anything slow (checkpoint, tokenisation) happens."""
  from adapter_tuning.data.glue import get_task
  from adapter_tuning.data.tasks import SOURCES
  if data.source not in SOURCES:
    raise UsageError(f'unknown data.source {data.source!r}; use one of {", ".join(SOURCES)}')
  if data.task.startswith('glue/'):
    get_task(data.task)
  elif data.task == 'mlm':
    _check_mlm(data)
  elif data.task not in ('squad', 'text', 'demo'):
    raise UsageError(f'unknown data.task {data.task!r}; use glue/<task>, squad, text, mlm or '
                     'demo')


def _check_mlm(data):
  """data.task=mlm: plain text files, a masking share in (0, 1), no packing."""
  if data.source != 'files':
    raise UsageError(f'data.task=mlm reads text files: set data.source=files with '
                     f'data.train_file and data.eval_file (got data.source={data.source!r})')
  if not 0 < data.mlm_probability < 1:
    raise UsageError(f'data.mlm_probability must be in (0, 1), got {data.mlm_probability}; '
                     "BERT's recipe uses 0.15")
  if data.packing:
    raise UsageError('data.packing does not apply to data.task=mlm (its head predicts '
                     'tokens, not one output per example); set data.packing=false')
