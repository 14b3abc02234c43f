#!/bin/bash
# head / adapters / full on every GLUE task in ../shared, one budget per task (docs/glue_minilm.md).
# usage: bash bench/glue_table.sh ROOT   (reruns skip finished runs; then: python bench/glue_table.py ROOT)
set -u
root=${1:?usage: bench/glue_table.sh ROOT}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$root"
for task in stsb cola sst2 mrpc rte wnli qnli; do
  steps=200; [ "$task" = stsb ] && steps=540
  for trainable in head adapters full; do
    lr=1e-3; [ "$trainable" = full ] && lr=5e-5
    dir="$root/${task}_${trainable}"
    [ -f "$dir/adapter/config.json" ] && continue
    "$py" -m adapter_tuning.train --config "configs/glue_$task.py" --workdir "$dir" --overwrite \
      --config.model.checkpoint=../shared/models/all-MiniLM-L6-v2 --config.data.source=glue_dir \
      --config.data.data_dir=../shared/data/glue --config.num_train_steps=$steps \
      --config.learning_rate=$lr --config.trainable=$trainable --config.progress_bar=False \
      > "$dir.log" 2>&1 || echo "FAILED: $dir (see $dir.log)"
  done
done
