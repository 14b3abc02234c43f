"""Every config key, with its default and one line on what it does.

Task configs import `get_config()` from here and override what differs. Any key may be
overridden on the command line: `--config.learning_rate=1e-3`. Unknown keys and values of
the wrong type are errors (ml_collections enforces both on overrides).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.checkpoint = 'bert-base-uncased'  # HF checkpoint directory or hub name (needs network)
  c.model.dtype = 'float32'                 # compute dtype: float32 | bfloat16 (params stay fp32)
  c.model.remat = False                     # rematerialise layers in backward (saves activation memory)
  c.model.scan_layers = False               # lax.scan over identical layers (modeling.Encoder.scan):
                                            # compiles slower; faster steps on BERT-base (BENCHMARKS.md)
  c.model.adapter = ml_collections.ConfigDict()
  c.model.adapter.size = 64                 # bottleneck width m (paper: 8, 64, 256)
  c.model.adapter.placement = 'houlsby'     # houlsby (2 per layer) | pfeiffer (FFN only) | none
  c.model.adapter.init_scale = 1e-3         # truncated-normal std of adapter weights; 0 = exact identity
  c.model.adapter.activation = 'gelu'       # gelu (exact) | gelu_tanh | relu | swish | tanh
  c.model.adapter.layers = ml_collections.FieldReference(None, field_type=tuple)  # layer indices with adapters; None or () = all
  c.model.adapter.original_ln_before = False  # adapter reads LN(x + h), LN again after (AdapterHub SeqBnConfig default)

  c.model.head = ml_collections.ConfigDict()
  c.model.head.pooling = 'pooler'           # sentence vector of classification/regression heads:
                                            # pooler (tanh over [CLS], the paper) | cls ([CLS]
                                            # state) | mean (over tokens; sentence-transformers)
  c.model.head.standardize_targets = True   # regression: learn (y - mean) / std of the train
                                            # split, folded back into the head for eval/artifact

  # What trains: adapters (adapters + all layer norms + head, the paper) | full | head | top:K,
  # or a tuple of (regex over '/'-joined param paths, 'train' | 'freeze') rules, first match wins.
  c.trainable = ml_collections.FieldReference('adapters', field_type=object)

  c.data = ml_collections.ConfigDict()
  c.data.task = 'glue/sst2'          # glue/<name> | squad | text (generic classification) | demo
  c.data.source = 'tfds'             # tfds | glue_dir | squad_json | files | generated (demo)
  c.data.data_dir = ''               # glue_dir: GLUE-layout TSV folder; tfds: TFDS data_dir ('' = default)
  c.data.train_file = ''             # squad_json / files: training file
  c.data.eval_file = ''              # squad_json / files: evaluation file
  c.data.tfds_name = ''              # task=text from TFDS: dataset name, e.g. imdb_reviews
  c.data.name = ''                   # task=text: the name adapters are known by ('' = TFDS name or data folder)
  c.data.text_key = 'text'           # task=text: column / feature with the text
  c.data.text_pair_key = ''          # task=text: optional second text column ('' = none)
  c.data.label_key = 'label'         # task=text: label column / feature
  c.data.max_seq_length = 128        # tokens per example after truncation (special tokens included)
  c.data.max_train_examples = 0      # use only the first N training examples (0 = all)
  c.data.max_eval_examples = 0       # use only the first N examples of each eval split (0 = all)
  c.data.num_buckets = 4             # static sequence-length buckets (fewer shapes = fewer compiles)
  c.data.min_bucket_length = 0       # shortest bucket; 0 = buckets double up to max_seq_length
  c.data.fit_buckets = True          # pick the num_buckets lengths from the data (least padding);
                                     # false = geometric up to max_seq_length (min_bucket_length)
  c.data.bucket_shape_cost = 8192    # fit_buckets: padded token positions a further compiled shape
                                     # must save (its compile time over the time of one padded
                                     # position; ~8k on 2 CPU cores); 0 = always num_buckets
  c.data.doc_stride = 128            # squad: stride between context windows
  c.data.max_query_length = 64       # squad: question tokens kept
  c.data.max_answer_length = 30      # squad: longest answer span considered at eval
  c.data.holdout_articles = 0.0      # squad_json with train_file == eval_file: fraction of articles held out for eval

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

  c.log_every_steps = 50             # train metrics to metrics.jsonl / TensorBoard
  c.eval_every_steps = 0             # evaluate every N steps (0 = only at the end)
  c.checkpoint_every_steps = 500     # orbax checkpoint every N steps (and always at the end)
  c.keep_checkpoints = 2             # checkpoints kept on disk
  c.progress_bar = True              # a progress bar on a terminal; plain log lines otherwise
  return c


def sweep():
  """No sweep by default; task configs define their own."""
  return []
