"""The PEFT family side by side on a CPU: MiniLM on GLUE SST-2, same steps for every method.

  python -m launch.sweep --config configs/sst2_minilm_peft.py --workdir runs/peft --seeds 0,1

Uses ../shared (the MiniLM checkpoint and the GLUE TSVs); 300 steps of 32 at length 64 per
run, each method at its usual learning rate, AdapterHub's and peft's recipe (`trainable=peft`:
the method's parameters and the head; LayerNorms frozen) next to the paper's (`adapters`:
LayerNorms train too), BitFit, the head alone and full fine-tuning.
"""

from configs import sst2_minilm_tradeoff


def get_config():
  config = sst2_minilm_tradeoff.get_config()  # MiniLM and the GLUE TSVs from ../shared
  config.data.max_seq_length = 64
  config.num_train_steps = 300
  return config


def sweep():
  none = {'model.adapter.placement': 'none'}
  return [
      {'trainable': 'adapters', 'learning_rate': 1e-3},  # Houlsby m=64, the paper's recipe
      {'trainable': 'peft', 'model.adapter.placement': 'parallel_ffn',
       'model.adapter.scaling': 4.0, 'learning_rate': 1e-3},  # scaled parallel FFN adapter
      {'trainable': 'peft', 'model.lora.rank': 8, 'model.lora.targets': 'query,value',
       'learning_rate': 1e-3, **none},
      {'trainable': 'peft', 'model.ia3.targets': 'key,value,intermediate',
       'learning_rate': 3e-3, **none},
      {'trainable': 'bitfit', 'learning_rate': 1e-3, **none},
      {'trainable': 'head', 'learning_rate': 1e-3, **none},
      {'trainable': 'full', 'learning_rate': 5e-5, **none},
  ]
