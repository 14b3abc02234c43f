#!/usr/bin/env bash
# Side by side with the peer (AdapterHub on PyTorch), alternating runs: these VMs drift.
#   bash bench/compare.sh [ROUNDS] [all|e2e] > results.jsonl
# OURS_E2E_ARGS adds config overrides to our end-to-end run, e.g.
#   OURS_E2E_ARGS="--config.data.num_buckets=7 --config.data.min_bucket_length=8"
# Needs ../peer-venv (see ../shared/bench/README.md) and the project's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
WHAT=${2:-all}
PEER="../peer-venv/bin/python ../shared/bench/peer_adapterhub.py"
OURS=".venv/bin/python bench/train_step.py"
E2E_WORK=$(mktemp -d)

ours_e2e() {  # $1 = cold (compilation cache off) | warm (a private cache, primed first)
  local cache_flag=(--compilation_cache=)
  [ "$1" = warm ] && cache_flag=(--compilation_cache="$E2E_WORK/cache")
  rm -rf "$E2E_WORK/run"
  local start end
  start=$(date +%s.%N)
  .venv/bin/python -m adapter_tuning.train --config configs/glue_sst2.py --workdir "$E2E_WORK/run" \
    --config.model.checkpoint=../shared/models/all-MiniLM-L6-v2 --config.data.source=glue_dir \
    --config.data.data_dir=../shared/data/glue --config.data.max_train_examples=4096 \
    --config.num_epochs=1 --config.learning_rate=1e-3 --config.eval_batch_size=64 \
    --config.progress_bar=false "${cache_flag[@]}" ${OURS_E2E_ARGS:-} > "$E2E_WORK/log" 2>&1
  end=$(date +%s.%N)
  python3 - "$E2E_WORK/run/metrics.jsonl" "$start" "$end" "$1" "${OURS_E2E_ARGS:-}" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
acc = [r['eval/accuracy'] for r in rows if 'eval/accuracy' in r][-1]
secs = [r['train/seconds'] for r in rows if 'train/seconds' in r][-1]
print(json.dumps({'tool': 'adapter_tuning', 'task': 'sst2', 'mode': 'adapter', 'cache': sys.argv[4],
                  'extra_args': sys.argv[5],
                  'wall_s_total': float(sys.argv[3]) - float(sys.argv[2]),
                  'wall_s_train_loop': secs, 'dev_accuracy': acc}))
PY
}

for round in $(seq "$ROUNDS"); do
  if [ "$WHAT" = e2e ]; then
    $PEER --task sst2 --mode adapter
    ours_e2e cold
    ours_e2e warm > /dev/null  # primes the cache (first round) or measures again
    ours_e2e warm
    continue
  fi
  # BERT-base geometry, batch 32, seq 128: adapter vs full steps.
  $PEER --model bert-base-random --modes adapter,full --steps 4 --warmup 1 --no-matmul
  $OURS --model bert-base --trainable adapters --steps 4 --warmup 1
  $OURS --model bert-base --trainable full --steps 4 --warmup 1
  # MiniLM (the real checkpoint), same shape.
  $PEER --modes adapter,full --steps 6 --warmup 2 --no-matmul
  $OURS --model ../shared/models/all-MiniLM-L6-v2 --trainable adapters --steps 6 --warmup 2
  $OURS --model ../shared/models/all-MiniLM-L6-v2 --trainable full --steps 6 --warmup 2
  # The end-to-end SST-2 job.
  $PEER --task sst2 --mode adapter
  ours_e2e cold
  ours_e2e warm > /dev/null
  ours_e2e warm
done
rm -rf "$E2E_WORK"
