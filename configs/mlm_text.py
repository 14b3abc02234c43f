"""A language/domain adapter (MAD-X's first stage): masked-LM training on plain text.

BERT's masking (15% of non-special tokens: 80% [MASK], 10% random, 10% kept) on a frozen
encoder with its own masked-LM head (loaded from a *ForMaskedLM checkpoint and frozen, or
initialised and trained when the checkpoint has none); perplexity on held-out text. E.g.
GLUE sentences as the domain's text:

  python -m adapter_tuning.train --config configs/mlm_text.py --workdir runs/mlm_sst2 \
    --config.model.checkpoint=../shared/models/all-MiniLM-L6-v2 \
    --config.data.train_file=../shared/data/glue/SST-2/train.tsv \
    --config.data.eval_file=../shared/data/glue/SST-2/dev.tsv --config.data.text_key=sentence

The artifact in runs/mlm_sst2/adapter is an ordinary adapter artifact (head 'mlm').
"""

from adapter_tuning import config as defaults


def get_config():
  config = defaults.get_config()
  config.model.checkpoint = 'bert-base-uncased'
  config.model.adapter.placement = 'pfeiffer'  # MAD-X's language adapters: one per layer
  config.model.adapter.size = 384              # MAD-X: reduction factor 2 on BERT-base
  config.trainable = 'peft'                    # adapters only (+ the head if initialised)
  config.data.task = 'mlm'
  config.data.source = 'files'
  config.data.train_file = 'train.txt'         # one text per line (or CSV/TSV/JSONL + text_key)
  config.data.eval_file = 'eval.txt'
  config.data.mlm_probability = 0.15
  config.data.max_seq_length = 128
  config.batch_size = 32
  config.learning_rate = 1e-4
  config.num_train_steps = 10_000
  config.eval_every_steps = 1_000              # adapter_best/ = lowest held-out perplexity
  config.log_every_steps = 100
  return config
