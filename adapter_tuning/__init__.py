"""adapter_tuning: parameter-efficient transfer learning with bottleneck adapters in JAX.

The public API is small: `load_pretrained` gives a frozen BERT-family encoder with fresh
adapters; `python -m adapter_tuning.train` trains them. Imports are lazy so that
`python -m adapter_tuning.train --help` starts fast.
"""

__all__ = ['load_pretrained', 'Pretrained', 'AdapterConfig']


def __getattr__(name):
  if name in ('load_pretrained', 'Pretrained'):
    from adapter_tuning.interop import pretrained
    return getattr(pretrained, name)
  if name == 'AdapterConfig':
    from adapter_tuning.peft.bottleneck import AdapterConfig
    return AdapterConfig
  raise AttributeError(name)
