"""Data sources -> raw examples (GLUE, text files) and tokenized examples -> fixed-shape batches."""
