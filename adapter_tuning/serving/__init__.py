"""Inference with trained artifacts: many adapters on one frozen base in one jitted pass."""
