"""A Flax Linen encoder for the BERT-like families of `models/families`, with PEFT hooks.

One module tree serves every family (BERT, RoBERTa, XLM-R, DistilBERT, ELECTRA, DeBERTa-v2,
ModernBERT, XLM-R-XL); what differs is either geometry in `ModelConfig` (no token types, a
narrower embedding projected up, no absolute positions, pre-LN norms) or asked of the family
(position ids, the pooler's activation, its own self-attention: DeBERTa's, or its own layer:
the pre-LN ones of `modernbert_layer`), and what a PEFT method adds is asked of its config at
each layer site (`peft`). Dropout masks (`dropout`), masks and sentence vectors over the
sequence axis, packed rows included (`sequences`), and remat policies (`remat`) have their own
modules. Parameter paths are what the rest
of the project matches on, and they do not depend on the family (a family's own tensor
names live only in its checkpoint key map): a PEFT method's parameters live under its
marker (bottleneck adapters: `*_adapter/`), every LayerNorm under `*layer_norm/`, the task
head under `head/`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from adapter_tuning.models.activations import ACTIVATIONS, bias_act
from adapter_tuning.models.dropout import Dropout
from adapter_tuning.models.remat import remat_policy
from adapter_tuning.models.sequences import head_mask, pool_tokens, same_segment, segment_positions


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Geometry of a BERT-family encoder, read from a Hugging Face `config.json`."""

  family: str = 'bert'  # config.json's model_type: a name of models/families
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_positions: int = 512
  type_vocab_size: int = 2
  pad_token_id: int = 0
  layer_norm_eps: float = 1e-12
  hidden_act: str = 'gelu'
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  # ELECTRA: embeddings (and their LayerNorm) at this width, then a Linear up to
  # hidden_size (`embeddings/project`); None = hidden_size, no projection.
  embedding_size: Optional[int] = None
  # DistilBERT's `sinusoidal_pos_embds`: a checkpoint lacking position embeddings gets the
  # fixed sine/cosine table instead of an error (the family's `missing_tensor`).
  sinusoidal_positions: bool = False
  # DeBERTa `position_biased_input` false: no absolute position table (positions enter
  # through the family's relative attention only).
  absolute_positions: bool = True
  # DeBERTa multiplies the normalised embeddings by the attention mask (padding rows 0).
  mask_embeddings: bool = False
  # The pooler's activation when config.json names one (DeBERTa `pooler_hidden_act`);
  # None: the family's `pooler_act`.
  pooler_act: Optional[str] = None
  # The family's own layer settings (DeBERTa: deberta_attention.Disentangled; ModernBERT:
  # modernbert_layer.Options).
  family_options: Optional[object] = None
  # Pre-LN families (ModernBERT, XLM-R-XL): LayerNorms without a bias, a LayerNorm after the
  # last layer, none on the embeddings (XLM-R-XL).
  norm_bias: bool = True
  final_norm: bool = False
  embedding_norm: bool = True
  # The pooler: what its dense layer reads ('cls': the first token; 'mean': the mean over real
  # tokens, ModernBERT's classifier_pooling), whether it has a bias, and whether a LayerNorm
  # follows its activation (ModernBERT's head.norm).
  pooler_input: str = 'cls'
  pooler_bias: bool = True
  pooler_norm: bool = False

  @property
  def embedding_width(self) -> int:
    return self.embedding_size or self.hidden_size

  @property
  def position_offset(self) -> int:
    """The first position id of a sequence (RoBERTa: pad_token_id + 1; BERT: 0)."""
    from adapter_tuning.models.families import family_named
    return family_named(self.family).position_offset(self)

  @property
  def max_seq_length(self) -> int:
    return self.max_positions - self.position_offset


class Embeddings(nn.Module):
  """Word + position (+ token type) embeddings, LayerNorm, dropout (+ projection).

  A family without token types (DistilBERT: type_vocab_size 0) has no token-type table and
  ignores token_type_ids; without absolute positions (DeBERTa-v3) there is no position
  table; `mask_embeddings` zeroes padding rows after the LayerNorm, as DeBERTa does.
  ELECTRA embeds at `embedding_size`, normalises there, and only then projects to
  hidden_size (HF `ElectraModel.embeddings_project`, after the dropout).
  """

  config: ModelConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids_BxT, token_type_ids_BxT, deterministic: bool, mask_BxT=None,
               positions_BxT=None):
    """`positions_BxT`: position ids (packed rows restart them per example); by default
    the family's."""
    from adapter_tuning.models.families import family_named
    cfg = self.config
    width = cfg.embedding_width
    if positions_BxT is None:
      positions_BxT = family_named(cfg.family).position_ids(input_ids_BxT, cfg)
    x = nn.Embed(cfg.vocab_size, width, name='word_embeddings')(input_ids_BxT)
    if cfg.absolute_positions:
      x += nn.Embed(cfg.max_positions, width, name='position_embeddings')(positions_BxT)
    if cfg.type_vocab_size:
      x += nn.Embed(cfg.type_vocab_size, width,
                    name='token_type_embeddings')(token_type_ids_BxT)
    if cfg.embedding_norm:
      x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_bias=cfg.norm_bias, name='layer_norm')(x)
    if cfg.mask_embeddings and mask_BxT is not None:
      x = x * mask_BxT[..., None].astype(x.dtype)
    x = Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
    if width != cfg.hidden_size:
      x = nn.Dense(cfg.hidden_size, dtype=self.dtype, name='project')(x)
    return x.astype(self.dtype)


def folded_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, mask_BxT, drop_probs):
  """Softmax attention with dropout on the probabilities, heads folded into the batch.
  The mask is per key [B, S] or per query and key [B, T, S] (ModernBERT's sliding window).

  [B*N, T, H] operands make both attention matmuls plain batched matmuls, which XLA:CPU
  runs ~1.5x faster than the equivalent 4-D einsums; the 1/sqrt(H) scale is applied to q
  (T/H times fewer elements than the logits). tests/test_step_equivalence.py checks it
  against the plain 4-D formulation.
  """
  b, t, n, h = q_BxTxNxH.shape
  s = k_BxTxNxH.shape[1]  # key positions: t, or t + P with prefixes
  fold = lambda y: y.transpose(0, 2, 1, 3).reshape(b * n, y.shape[1], h)
  q = fold(q_BxTxNxH * jnp.asarray(h ** -0.5, q_BxTxNxH.dtype))
  logits_BxNxTxT = jax.lax.dot_general(
      q, fold(k_BxTxNxH), (((2,), (2,)), ((0,), (0,)))).reshape(b, n, t, s)
  big_neg = jnp.finfo(logits_BxNxTxT.dtype).min
  logits_BxNxTxT = jnp.where(head_mask(mask_BxT), logits_BxNxTxT, big_neg)
  probs_BxNxTxT = drop_probs(jax.nn.softmax(logits_BxNxTxT.astype(jnp.float32), axis=-1))
  out = jax.lax.dot_general(probs_BxNxTxT.astype(v_BxTxNxH.dtype).reshape(b * n, t, s),
                            fold(v_BxTxNxH), (((2,), (1,)), ((0,), (0,))))
  return out.reshape(b, n, t, h).transpose(0, 2, 1, 3)


class SelfAttention(nn.Module):
  """Multi-head self-attention; `jax.nn.dot_product_attention` when no attention dropout.

  (A single fused [D, 3D] QKV matmul was measured too: it needs the three frozen kernels
  concatenated on every step, which cost more than it saved at short lengths.)
  """

  config: ModelConfig
  dtype: jnp.dtype = jnp.float32
  adapter: Optional[object] = None  # the PEFT method's config: hooks at the projections
  index: int = 0  # the layer's index, for the hooks

  @nn.compact
  def __call__(self, x_BxTxD, mask_BxT, deterministic: bool, dropout_rng=None, prefix_kv=None,
               shared=None):
    """`prefix_kv`: (keys and values [2, P, N, H] every query attends to before its own,
    which of the P positions are in use [P] or None for all). `shared`: what a family
    attention shares across layers (`families.Attention`); always None here."""
    del shared
    cfg = self.config
    head_dim = cfg.hidden_size // cfg.num_heads
    project = lambda site, x, y: hooked(self.adapter, self.index, site, self.dtype, x, y,
                                        _site_rng(dropout_rng, site))
    dense = lambda name: project(name, x_BxTxD, nn.DenseGeneral(
        (cfg.num_heads, head_dim), dtype=self.dtype, name=name)(x_BxTxD))
    q_BxTxNxH = dense('query')
    k_BxTxNxH = dense('key')
    v_BxTxNxH = dense('value')
    if prefix_kv is not None:
      k_BxTxNxH, v_BxTxNxH, mask_BxT = with_prefix(prefix_kv, k_BxTxNxH, v_BxTxNxH, mask_BxT)
    if not deterministic and cfg.attention_dropout > 0:
      drop = Dropout(cfg.attention_dropout)
      out_BxTxNxH = folded_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, mask_BxT,
                                     lambda p: drop(p, deterministic=False, rng=dropout_rng))
    else:
      out_BxTxNxH = jax.nn.dot_product_attention(
          q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, mask=head_mask(mask_BxT))
    return project('attention_out', out_BxTxNxH, nn.DenseGeneral(
        cfg.hidden_size, axis=(-2, -1), dtype=self.dtype, name='out')(out_BxTxNxH))


class DenseAct(nn.Module):
  """act(x W + b) with nn.Dense's parameters, the bias added inside `bias_act`.

  For exact GELU that is `activations.bias_gelu`, whose VJP keeps only x W: see there.
  """

  features: int
  act: str
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, pre_act=None):
    """`pre_act(x, y)`: what a PEFT hook makes of y = x W + b, before the activation
    (`peft` site 'intermediate_dense'); the bias then joins y there instead of in bias_act."""
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,)).astype(self.dtype)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if pre_act is not None:
      y, bias = pre_act(x, y + bias), jnp.zeros_like(bias)
    return bias_act(self.act)(y, bias)


def hooked(peft_config, layer: int, site: str, dtype, x, y, rng=None):
  """y, or what the PEFT method's module at a projection site makes of (x, y) (peft);
  `rng` is the site's dropout key, None when deterministic."""
  hook = None if peft_config is None else peft_config.hook(layer, site, dtype)
  return y if hook is None else hook(x, y, rng)


def _site_rng(rng, site: str):
  """A projection site's own dropout key, folded from its layer's (or attention's) key with
  an index no other mask of that layer uses (they fold in 0, 1, 2)."""
  from adapter_tuning import peft
  return None if rng is None else jax.random.fold_in(rng, 100 + peft.SITES.index(site))


class TransformerLayer(nn.Module):
  """Post-LN layer: LN(x + hook(Drop(Attn(x)))), then LN(h + hook(Drop(FFN(h)))).

  `adapter` is the PEFT method's config (peft): at each site the layer runs the module it
  hands out, if any: bottleneck adapters at the two sub-layer sites.
  """

  config: ModelConfig
  adapter: Optional[object]  # a peft method config (bottleneck.AdapterConfig)
  index: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, mask_BxT, deterministic: bool, dropout_rng=None, prefix_kv=None,
               shared=None):
    """`dropout_rng`: this layer's key; its three dropout masks fold in 0, 1, 2.
    `prefix_kv`: this layer's attention key/value prefixes (prefix tuning), or None.
    `shared`: the family attention's per-encoder inputs (`families.Attention`), or None."""
    from adapter_tuning.models.families import family_named
    cfg = self.config
    family_attention = family_named(cfg.family).attention
    attention_cls = SelfAttention if family_attention is None else family_attention.layer
    key = lambda k: None if dropout_rng is None else jax.random.fold_in(dropout_rng, k)
    drop = lambda y, k: Dropout(cfg.hidden_dropout)(y, deterministic=deterministic, rng=key(k))
    ln = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name=name)

    hook = lambda site: None if self.adapter is None else self.adapter.hook(
        self.index, site, self.dtype)
    project = lambda site, x, y: hooked(self.adapter, self.index, site, self.dtype, x, y,
                                        _site_rng(dropout_rng, site))

    def add_and_norm(site, residual_BxTxD, y_BxTxD):
      norm = ln(f'{site}_layer_norm')
      if (module := hook(site)) is not None:
        y_BxTxD = module(y_BxTxD, residual_BxTxD, norm)
      return norm(residual_BxTxD + y_BxTxD)

    a_BxTxD = drop(attention_cls(cfg, self.dtype, self.adapter, self.index, name='attention')(
        x_BxTxD, mask_BxT, deterministic, key(0), prefix_kv, shared), 1)
    h_BxTxD = add_and_norm('attention', x_BxTxD, a_BxTxD)

    dense_hook = lambda x, y: project('intermediate_dense', x, y)
    f_BxTxF = project('intermediate', h_BxTxD, DenseAct(
        cfg.intermediate_size, cfg.hidden_act, self.dtype, name='intermediate')(h_BxTxD,
                                                                                 dense_hook))
    f_BxTxD = project('output', f_BxTxF,
                      nn.Dense(cfg.hidden_size, dtype=self.dtype, name='output')(f_BxTxF))
    return add_and_norm('ffn', h_BxTxD, drop(f_BxTxD, 2))


class Encoder(nn.Module):
  """Embeddings, the layer stack and the pooler; returns last hidden state and pooled [CLS].

  The pooler is act(dense([CLS] state)) with the family's `pooler_act` (or config.json's,
  `ModelConfig.pooler_act`: DeBERTa's `ContextPooler`): BERT's tanh pooler,
  or for families without one the first layer of their HF sequence classifier (DistilBERT's
  ReLU `pre_classifier`, ELECTRA's GELU `classifier.dense`), so `pooling=pooler` plus our
  linear head is exactly that family's classifier.

  Attributes:
    remat: rematerialise each layer in the backward pass (less memory, ~1/3 more compute),
      with a `remat_policy` saying what each layer keeps (`REMAT_POLICIES`).
    scan: run runs of identically shaped layers as one `lax.scan` over their stacked
      parameters, so the program holds one layer body instead of num_layers copies.
      Measured on XLA:CPU (BENCHMARKS.md): BERT-base steps faster, MiniLM steps and every
      compile slower, so it is off by default (`model.scan_layers`). Parameters
      stay stored per layer (`layer_{i}`, as in Hugging Face checkpoints and artifacts); the
      stacking happens inside the jitted step. Numbers equal the unrolled stack (each layer
      draws its dropout key by folding its index into one key, in both forms;
      tests/test_step_equivalence.py).

  No stop-gradient is needed below the lowest trained layer: JAX's transpose computes
  cotangents only on paths that lead to differentiated (trainable) inputs, so the backward
  pass already ends there (tests/test_step_equivalence.py checks it in the compiled FLOPs).
  """

  config: ModelConfig
  adapter: Optional[object] = None  # a peft method config (bottleneck.AdapterConfig)
  dtype: jnp.dtype = jnp.float32
  remat: bool | str = False  # a `remat_policy` name; True = 'full', False = 'none'
  scan: bool = False

  @nn.compact
  def __call__(self, input_ids_BxT, attention_mask_BxT, token_type_ids_BxT=None,
               deterministic: bool = True, segments=None):
    """`segments`: for rows that pack several examples (data.packing), their segment_ids
    [B, T] (1, 2, ... per example, 0 padding), example_row [E] and example_start [E]:
    attention stays within an example, positions restart per example, and `pooled` is
    [E, D], one vector per example."""
    from adapter_tuning.models.families import family_named
    cfg = self.config
    family = family_named(cfg.family)
    if token_type_ids_BxT is None:
      token_type_ids_BxT = jnp.zeros_like(input_ids_BxT)
    mask_BxT = attention_mask_BxT.astype(bool)
    positions_BxT = None
    if segments is not None:
      positions_BxT = family.position_offset(cfg) + segment_positions(segments['segment_ids'])
    x_BxTxD = Embeddings(cfg, self.dtype, name='embeddings')(
        input_ids_BxT, token_type_ids_BxT, deterministic, mask_BxT, positions_BxT)
    if segments is not None:
      mask_BxT = same_segment(segments['segment_ids'])  # [B, T, T] from here on
    shared = None if family.attention is None else family.attention.shared(
        cfg, self.dtype, name='relative_positions')(input_ids_BxT.shape[1])
    layers_rng = None if deterministic else self.make_rng('dropout')
    prefix_module = None if self.adapter is None else self.adapter.encoder_hook(cfg, self.dtype)
    prefix = None if prefix_module is None else prefix_module()  # ([L, 2, P, N, H], [L, P])
    if self.scan and not self.is_initializing():
      x_BxTxD = self._scanned_layers(x_BxTxD, mask_BxT, deterministic, layers_rng,
                                     prefix, shared)
    else:
      remat, policy = remat_policy(self.remat)
      layer_cls = (nn.remat(family_layer(cfg), static_argnums=(3,), policy=policy) if remat
                   else family_layer(cfg))
      for i in range(cfg.num_layers):
        x_BxTxD = layer_cls(cfg, self.adapter, i, self.dtype, name=f'layer_{i}')(
            x_BxTxD, mask_BxT, deterministic, _layer_rng(layers_rng, i),
            None if prefix is None else jax.tree.map(lambda a, i=i: a[i], prefix), shared)
    if cfg.final_norm:
      x_BxTxD = nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_bias=cfg.norm_bias, dtype=self.dtype,
                             name='final_layer_norm')(x_BxTxD)
    pooled_BxD = Pooler(cfg, cfg.pooler_act or family.pooler_act, self.dtype, name='pooler')(
        x_BxTxD, attention_mask_BxT, segments)
    return {'last_hidden_state': x_BxTxD, 'pooled': pooled_BxD}

  def _scanned_layers(self, x_BxTxD, mask_BxT, deterministic, layers_rng, prefix_kv=None,
                      shared=None):
    params = self.variables['params']
    layers = [params[f'layer_{i}'] for i in range(self.config.num_layers)]
    variant = getattr(family_layer(self.config), 'variant', lambda config, index: None)
    variants = [variant(self.config, i) for i in range(len(layers))]
    for first, last in _uniform_runs(layers, variants):
      layer = family_layer(self.config)(self.config, self.adapter, first, self.dtype,
                                        parent=None)

      def body(x, per_layer, layer=layer):
        layer_params, i, kv = per_layer
        return layer.apply({'params': layer_params}, x, mask_BxT, deterministic,
                           _layer_rng(layers_rng, i), kv, shared), None

      remat, policy = remat_policy(self.remat)
      if remat:
        body = jax.checkpoint(body, policy=policy)
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                             *[params[f'layer_{i}'] for i in range(first, last + 1)])
      kv = None if prefix_kv is None else jax.tree.map(lambda a, f=first, l=last: a[f:l + 1],
                                                       prefix_kv)
      x_BxTxD, _ = jax.lax.scan(body, x_BxTxD, (stacked, jnp.arange(first, last + 1), kv))
    return x_BxTxD


class Pooler(nn.Module):
  """act(dense(first token or masked mean)) (+ LayerNorm): the first layer of a family's
  sequence classifier. Params `kernel`, `bias` as nn.Dense's (so BERT's pooler paths are
  nn.Dense's), ModernBERT's `norm/`."""

  config: ModelConfig
  act: str
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, mask_BxT, segments=None):
    cfg = self.config
    x_BxD = pool_tokens(x_BxTxD, mask_BxT, cfg.pooler_input, segments)
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (x_BxD.shape[-1], cfg.hidden_size))
    y_BxD = jnp.dot(x_BxD.astype(self.dtype), kernel.astype(self.dtype))
    if cfg.pooler_bias:
      y_BxD += self.param('bias', nn.initializers.zeros_init(), (cfg.hidden_size,)
                          ).astype(self.dtype)
    y_BxD = ACTIVATIONS[self.act](y_BxD)
    if cfg.pooler_norm:
      y_BxD = nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_bias=cfg.norm_bias, dtype=self.dtype,
                           name='norm')(y_BxD)
    return y_BxD


def family_layer(cfg: ModelConfig):
  """The transformer layer module of cfg's family: its own (ModernBERT's pre-LN layer) or
  BERT's post-LN `TransformerLayer`."""
  from adapter_tuning.models.families import family_named
  return family_named(cfg.family).layer or TransformerLayer


def with_prefix(prefix_kv, k_BxTxNxH, v_BxTxNxH, mask_BxT):
  """Keys, values and key mask with the P prefix positions first (every query sees those in
  use: all of them, or where the prefix's own mask says so -- serving several artifacts, a
  shorter prefix or none at all is padded with positions no query sees)."""
  kv_2xPxNxH, keep_P = prefix_kv
  b, p = k_BxTxNxH.shape[0], kv_2xPxNxH.shape[1]
  batch = lambda y_PxNxH: jnp.broadcast_to(y_PxNxH.astype(k_BxTxNxH.dtype),
                                           (b,) + y_PxNxH.shape)
  keep_BxP = jnp.ones((b, p), bool) if keep_P is None else jnp.broadcast_to(keep_P, (b, p))
  if mask_BxT.ndim == 3:  # a query-by-key mask: every query sees the prefix alike
    keep_BxP = jnp.broadcast_to(keep_BxP[:, None], (b, mask_BxT.shape[1], p))
  return (jnp.concatenate([batch(kv_2xPxNxH[0]), k_BxTxNxH], axis=1),
          jnp.concatenate([batch(kv_2xPxNxH[1]), v_BxTxNxH], axis=1),
          jnp.concatenate([keep_BxP, mask_BxT], axis=-1))


def _layer_rng(layers_rng, index):
  return None if layers_rng is None else jax.random.fold_in(layers_rng, index)


def _uniform_runs(layer_params: list, variants: list) -> list[tuple[int, int]]:
  """(first, last) index of each maximal run of layers with identical parameter shapes and
  the same variant (layers differ where adapters sit in some layers only; a family's layer
  may compute differently by index: ModernBERT's global and sliding-window layers)."""
  signature = lambda i: (jax.tree.structure(layer_params[i]), variants[i],
                         tuple((x.shape, x.dtype) for x in jax.tree.leaves(layer_params[i])))
  runs = []
  for i in range(len(layer_params)):
    if runs and signature(runs[-1][0]) == signature(i):
      runs[-1] = (runs[-1][0], i)
    else:
      runs.append((i, i))
  return runs
