"""Random-weight checkpoints at the released base geometries of each encoder family.

  python bench/family_checkpoints.py --out /tmp/families [--family modernbert-base ...]

Writes OUT/NAME/ (config.json, model.safetensors, a placeholder tokenizer.json: MiniLM's,
since benchmarks feed random ids) with transformers' own random init, so that our
`bench/train_step.py --model OUT/NAME` and the peer's `bench/peer_methods.py --model
OUT/NAME` time the same architecture without a download. Speed does not depend on the
weights. Geometries are those of the hub configs named in GEOMETRIES.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil

MINILM_TOKENIZER = (pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'models' /
                    'all-MiniLM-L6-v2' / 'tokenizer.json')

# name -> (transformers config class, its kwargs): the hub config's geometry.
GEOMETRIES = {
    # microsoft/deberta-v3-base
    'deberta-v3-base': ('DebertaV2Config', dict(
        vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=512, relative_attention=True,
        pos_att_type=['p2c', 'c2p'], position_buckets=256, max_relative_positions=-1,
        share_att_key=True, norm_rel_ebd='layer_norm', position_biased_input=False,
        type_vocab_size=0, layer_norm_eps=1e-7, pooler_hidden_act='gelu')),
    # answerdotai/ModernBERT-base
    'modernbert-base': ('ModernBertConfig', dict(
        vocab_size=50368, hidden_size=768, num_hidden_layers=22, num_attention_heads=12,
        intermediate_size=1152, max_position_embeddings=8192, global_attn_every_n_layers=3,
        local_attention=128, global_rope_theta=160000.0, local_rope_theta=10000.0)),
    # distilbert-base-uncased
    'distilbert-base': ('DistilBertConfig', dict(vocab_size=30522, dim=768, n_layers=6,
                                                 n_heads=12, hidden_dim=3072)),
    # google/electra-base-discriminator
    'electra-base': ('ElectraConfig', dict(vocab_size=30522, embedding_size=768,
                                           hidden_size=768, num_hidden_layers=12,
                                           num_attention_heads=12, intermediate_size=3072)),
}


def write(name: str, out: pathlib.Path) -> pathlib.Path:
  import torch
  import transformers
  class_name, kwargs = GEOMETRIES[name]
  config = getattr(transformers, class_name)(**kwargs)
  torch.manual_seed(0)
  model = transformers.AutoModel.from_config(config)
  directory = out / name
  model.save_pretrained(directory)
  shutil.copyfile(MINILM_TOKENIZER, directory / 'tokenizer.json')
  return directory


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out', required=True, type=pathlib.Path)
  p.add_argument('--family', nargs='*', default=sorted(GEOMETRIES), choices=sorted(GEOMETRIES))
  args = p.parse_args(argv)
  for name in args.family:
    print(write(name, args.out))


if __name__ == '__main__':
  main()
