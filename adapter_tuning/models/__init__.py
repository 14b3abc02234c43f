"""The networks: the BERT-family encoder, its activations, and the task heads on top."""
