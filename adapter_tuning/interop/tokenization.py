"""The checkpoint's own tokenizer, via Hugging Face `tokenizers` (Rust, batched).

Tokenising must match what the checkpoint was trained with, so we load the checkpoint's
`tokenizer.json` when it has one, and otherwise rebuild the same pipeline from `vocab.txt`
(BERT WordPiece), `vocab.json` + `merges.txt` (RoBERTa byte-level BPE) or `spm.model`
(DeBERTa-v2/v3's SentencePiece unigram: `sentencepiece_unigram`). Padding and
truncation settings stored in `tokenizer.json` are switched off: the data pipeline pads
per length bucket, and truncation length is chosen per call.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import tokenizers
from tokenizers import processors

from adapter_tuning.errors import UsageError
from adapter_tuning.models.families import family_named


class Tokenizer:
  """A `tokenizers.Tokenizer` plus the few facts the data pipeline needs.

  Attributes:
    backend: the Rust tokenizer, padding and truncation disabled.
    family: the encoder family's name; its `models/families` entry says how one or two
      texts are wrapped in special tokens (BERT: [CLS] a [SEP] b [SEP], type ids 0/1;
      RoBERTa: <s> a </s></s> b </s>, type ids all 0).
    cls_id, sep_id, pad_id: special token ids.
  """

  def __init__(self, backend: tokenizers.Tokenizer, family: str, pad_id: int):
    backend.no_padding()
    backend.no_truncation()
    self.backend = backend
    self.family = family
    self._family = family_named(family)
    self.pad_id = pad_id
    cls_token, sep_token = self._family.special_tokens
    self.cls_id = backend.token_to_id(cls_token)
    self.sep_id = backend.token_to_id(sep_token)
    if self.cls_id is None or self.sep_id is None:
      raise UsageError(f'tokenizer has no {cls_token}/{sep_token} tokens; '
                       f'use the tokenizer files saved with the {family} checkpoint')

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  @property
  def num_special_tokens_pair(self) -> int:
    return self._family.num_special_tokens_pair

  def build_pair(self, ids_a, ids_b=None):
    """Adds special tokens around one or two id sequences, as the checkpoint does."""
    return self._family.build_pair(self.cls_id, self.sep_id, ids_a, ids_b)

  def tokenize(self, texts, text_pairs=None, max_length: int = 128):
    """Tokenises a batch: ragged int32 `input_ids` and `token_type_ids`, with special tokens.

    Truncation is 'longest first' to `max_length`, as Hugging Face does by default.
    """
    if max_length < self.num_special_tokens_pair + 1:
      raise UsageError(f'max_length={max_length} is too small; use at least '
                       f'{self.num_special_tokens_pair + 1}')
    texts = list(texts)
    self.backend.enable_truncation(max_length, strategy='longest_first')
    try:
      if text_pairs is None:
        encodings = self.backend.encode_batch(texts)
      else:
        text_pairs = list(text_pairs)
        if len(text_pairs) != len(texts):
          raise UsageError(f'{len(texts)} texts but {len(text_pairs)} text pairs; '
                           'give one pair per text')
        encodings = self.backend.encode_batch(list(zip(texts, text_pairs)))
    finally:
      self.backend.no_truncation()
    input_ids = [np.asarray(e.ids, np.int32) for e in encodings]
    type_ids = [np.asarray(e.type_ids, np.int32) for e in encodings]
    return input_ids, type_ids

  def pad(self, input_ids, token_type_ids, length: int | None = None):
    """Right-pads ragged sequences into [B, L] arrays with an attention mask."""
    length = length or max(len(x) for x in input_ids)
    batch = len(input_ids)
    ids = np.full((batch, length), self.pad_id, np.int32)
    types = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), np.int32)
    for i, (x, t) in enumerate(zip(input_ids, token_type_ids)):
      ids[i, :len(x)] = x
      types[i, :len(t)] = t
      mask[i, :len(x)] = 1
    return {'input_ids': ids, 'token_type_ids': types, 'attention_mask': mask}


def load_tokenizer(directory: pathlib.Path, family: str, pad_id: int) -> Tokenizer:
  """Loads the tokenizer files of a Hugging Face checkpoint directory."""
  directory = pathlib.Path(directory)
  tokenizer_json = directory / 'tokenizer.json'
  if tokenizer_json.exists():
    return Tokenizer(tokenizers.Tokenizer.from_file(str(tokenizer_json)), family, pad_id)
  options = {}
  if (directory / 'tokenizer_config.json').exists():
    options = json.loads((directory / 'tokenizer_config.json').read_text())
  if (directory / 'vocab.txt').exists():
    from tokenizers.implementations import BertWordPieceTokenizer
    wordpiece = BertWordPieceTokenizer(
        str(directory / 'vocab.txt'),
        lowercase=options.get('do_lower_case', True),
        strip_accents=options.get('strip_accents'),
        handle_chinese_chars=options.get('tokenize_chinese_chars', True))
    return Tokenizer(wordpiece._tokenizer, family, pad_id)  # pylint: disable=protected-access
  if (directory / 'vocab.json').exists() and (directory / 'merges.txt').exists():
    from tokenizers.implementations import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer(
        str(directory / 'vocab.json'), str(directory / 'merges.txt'),
        add_prefix_space=options.get('add_prefix_space', False),
        trim_offsets=options.get('trim_offsets', True))
    backend = bpe._tokenizer  # pylint: disable=protected-access
    backend.post_processor = processors.RobertaProcessing(
        ('</s>', backend.token_to_id('</s>')), ('<s>', backend.token_to_id('<s>')),
        add_prefix_space=options.get('add_prefix_space', False),
        trim_offsets=options.get('trim_offsets', True))
    return Tokenizer(backend, family, pad_id)
  if (directory / 'spm.model').exists():
    return Tokenizer(sentencepiece_unigram(directory / 'spm.model', options), family, pad_id)
  raise UsageError(f'no tokenizer in {directory}: expected tokenizer.json, vocab.txt, '
                   'vocab.json + merges.txt, or spm.model; save the tokenizer next to the weights')


def sentencepiece_unigram(path: pathlib.Path, options: dict) -> tokenizers.Tokenizer:
  """DeBERTa-v2/v3's `spm.model` (the only tokenizer file their hub repos ship) as the
  `tokenizers` pipeline transformers' fast DeBERTa-v2 tokenizer builds from it: the
  model's unigram pieces and scores, its precompiled normaliser (after lower-casing when
  `do_lower_case`, and a strip), runs of spaces collapsed, punctuation split off when
  `split_by_punct`, '▁' word prefixes, and [CLS] a [SEP] b [SEP] with type ids 0/1.
  tests/test_tokenization_spm.py checks it against transformers' SentencePiece tokenizer."""
  from tokenizers import Regex, models, normalizers, pre_tokenizers
  try:
    from sentencepiece import sentencepiece_model_pb2
  except ImportError:
    raise UsageError(f'{path} is a SentencePiece model: pip install sentencepiece to read it') \
        from None
  proto = sentencepiece_model_pb2.ModelProto()
  try:
    proto.ParseFromString(path.read_bytes())
  except Exception:  # protobuf's DecodeError and friends: not a SentencePiece model
    raise UsageError(f'{path} is not a readable SentencePiece model; re-download it') from None
  if proto.trainer_spec.model_type != proto.trainer_spec.UNIGRAM:
    raise UsageError(f'{path} is not a unigram SentencePiece model (DeBERTa-v2/v3 use unigram)')
  backend = tokenizers.Tokenizer(models.Unigram(
      [(p.piece, p.score) for p in proto.pieces], proto.trainer_spec.unk_id, byte_fallback=False))
  steps = [normalizers.Lowercase()] if options.get('do_lower_case', False) else []
  steps.append(normalizers.Strip())
  if proto.normalizer_spec.precompiled_charsmap:
    steps.append(normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap))
  steps.append(normalizers.Replace(Regex(' {2,}'), ' '))
  backend.normalizer = normalizers.Sequence(steps)
  prepend = 'always' if proto.normalizer_spec.add_dummy_prefix else 'never'
  splits = [pre_tokenizers.Punctuation('isolated')] if options.get('split_by_punct') else []
  backend.pre_tokenizer = pre_tokenizers.Sequence(
      splits + [pre_tokenizers.Metaspace(replacement='▁', prepend_scheme=prepend)])
  cls_id, sep_id = backend.token_to_id('[CLS]'), backend.token_to_id('[SEP]')
  if cls_id is None or sep_id is None:
    raise UsageError(f'{path} has no [CLS]/[SEP] pieces; it is not a DeBERTa SentencePiece model')
  backend.post_processor = processors.TemplateProcessing(
      single='[CLS]:0 $A:0 [SEP]:0', pair='[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1',
      special_tokens=[('[CLS]', cls_id), ('[SEP]', sep_id)])
  return backend
