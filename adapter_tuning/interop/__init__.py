"""Formats in and out: Hugging Face checkpoints and tokenizers, adapter artifacts, AdapterHub."""
