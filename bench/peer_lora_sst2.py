"""The peer's LoRA: AdapterHub's `LoRAConfig` on the SST-2 job of ../shared/bench/peer_adapterhub.py.

Same data, tokenisation, schedule, optimizer and head as that script's `--task sst2 --mode
adapter` ([CLS] state -> one linear layer); only the method changes: LoRA rank 8, alpha 8 on
the query and value projections, and AdapterHub's / peft's recipe (`train_adapter`: LoRA and
the head train, every LayerNorm stays frozen). Run from the project root with the peer venv:

  ../peer-venv/bin/python bench/peer_lora_sst2.py --task sst2 --mode adapter --seq-len 64 \\
      --max-train-examples 9600 --lr 1e-3 [--seed 1]

and ours on the same recipe (`model.head.pooling=cls` reads the [CLS] state like the peer):

  python -m adapter_tuning.train --config configs/sst2_minilm_peft.py --workdir runs/lora_cls \\
      --config.trainable=peft --config.model.adapter.placement=none --config.model.lora.rank=8 \\
      --config.learning_rate=1e-3 --config.model.head.pooling=cls
"""

import importlib.util
import pathlib
import sys

PEER = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'bench' / 'peer_adapterhub.py'


def main():
  spec = importlib.util.spec_from_file_location('peer_adapterhub', PEER)
  peer = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(peer)
  build_without_adapter = peer.build_model

  def build_model(args, with_adapter):
    import adapters
    model, load_info, _ = build_without_adapter(args, with_adapter=False)
    model.add_adapter('lora', config=adapters.LoRAConfig(r=8, alpha=8, attn_matrices=['q', 'v']))
    return model, load_info, None

  def set_trainable(model, mode):
    assert mode == 'adapter', 'this script runs the LoRA (adapter) mode only'
    model.train_adapter('lora')  # freezes the base (LayerNorms too); LoRA and the head train
    model.train()

  peer.build_model, peer.set_trainable = build_model, set_trainable
  sys.argv[0] = str(PEER)
  peer.main()


if __name__ == '__main__':
  main()
