"""Every task's data: sources (GLUE, text files, SQuAD, demo) -> tokenized TaskData -> batches,
and the official metrics that score the predictions."""
