"""The PEFT family side by side on a CPU: MiniLM on GLUE SST-2, same steps for every method.

  python -m launch.sweep --config configs/sst2_minilm_peft.py --workdir runs/peft --seeds 0,1

Uses ../shared (the MiniLM checkpoint and the GLUE TSVs); 300 steps of 32 at length 64 per
run, each method at its usual learning rate, AdapterHub's and peft's recipe (`trainable=peft`:
the method's parameters and the head; LayerNorms frozen) next to the paper's (`adapters`:
LayerNorms train too), prefix tuning and MAM, BitFit, the head alone and full fine-tuning.
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
      {'trainable': 'peft', 'model.prefix.length': 30, 'model.prefix.bottleneck': 512,
       'learning_rate': 3e-4, **none},  # prefix tuning (collapses on some seeds at 1e-3)
      {'trainable': 'peft', 'model.prefix.length': 30, 'model.prefix.bottleneck': 800,
       'model.adapter.placement': 'parallel_ffn', 'model.adapter.size': 192,
       'model.adapter.scaling': 4.0, 'model.adapter.activation': 'relu',
       'learning_rate': 3e-4},  # MAM, as AdapterHub's MAMConfig (m = d / 2)
      {'trainable': 'bitfit', 'learning_rate': 1e-3, **none},
      {'trainable': 'head', 'learning_rate': 1e-3, **none},
      {'trainable': 'full', 'learning_rate': 5e-5, **none},
  ]
