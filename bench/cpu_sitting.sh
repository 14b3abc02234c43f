#!/usr/bin/env bash
# One sitting on this CPU kind, alternating with the peer (issue: performance on every CPU
# kind): BERT-base and MiniLM adapter steps, MiniLM in bfloat16, the SST-2 job with length
# buckets and with sequence packing (and in bfloat16), and the MiniLM step's profile.
#   bash bench/cpu_sitting.sh [ROUNDS] > results.jsonl
# The first line is the host (lscpu model and flags). Needs ../peer-venv and .venv.
set -uo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
PEER="../peer-venv/bin/python ../shared/bench/peer_adapterhub.py"
OURS=".venv/bin/python bench/train_step.py"
MINILM=../shared/models/all-MiniLM-L6-v2
WORK=$(mktemp -d)

sst2_job() {  # $1 = label, rest = extra config overrides; one JSON line
  # CACHE='' (cold: nothing reused) or a folder (warm: `train`'s persistent compilation
  # cache, as every run after the first of a sweep or a re-run finds it)
  local label=$1 start end
  shift
  rm -rf "$WORK/run"
  start=$(date +%s.%N)
  .venv/bin/python -m adapter_tuning.train --config configs/glue_sst2.py --workdir "$WORK/run" \
    --config.model.checkpoint=$MINILM --config.data.source=glue_dir \
    --config.data.data_dir=../shared/data/glue --config.data.max_train_examples=4096 \
    --config.num_epochs=1 --config.learning_rate=1e-3 --config.eval_batch_size=64 \
    --config.progress_bar=false --compilation_cache="${CACHE:-}" "$@" > "$WORK/log" 2>&1
  end=$(date +%s.%N)
  python3 - "$WORK/run/metrics.jsonl" "$start" "$end" "$label" "$WORK/log" <<'PY'
import json, re, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
acc = [r['eval/accuracy'] for r in rows if 'eval/accuracy' in r][-1]
log = open(sys.argv[5]).read()
ratio = re.search(r'\(([\d.]+) positions per real token', log)
print(json.dumps({'tool': 'adapter_tuning', 'task': 'sst2', 'mode': 'adapter',
                  'variant': sys.argv[4], 'wall_s_total': float(sys.argv[3]) - float(sys.argv[2]),
                  'dev_accuracy': acc,
                  'positions_per_real_token': float(ratio.group(1)) if ratio else None}))
PY
}

python3 bench/method_specs.py  # header: CPU model and flags, date
for round in $(seq "$ROUNDS"); do
  $PEER --model bert-base-random --modes adapter --steps 3 --warmup 1 --no-matmul
  $OURS --model bert-base --trainable adapters --steps 3 --warmup 1
  $PEER --modes adapter --steps 4 --warmup 1 --no-matmul
  $OURS --model $MINILM --trainable adapters --steps 4 --warmup 1
  $OURS --model $MINILM --trainable adapters --steps 4 --warmup 1 --dtype bfloat16
  $PEER --task sst2 --mode adapter
  sst2_job buckets
  sst2_job packing --config.data.packing=true
  rm -rf "$WORK/cache"; CACHE="$WORK/cache" sst2_job fill_cache --config.data.packing=true >/dev/null
  CACHE="$WORK/cache" sst2_job packing_warm_cache --config.data.packing=true
  [ "$round" = 1 ] && sst2_job packing_bf16 --config.data.packing=true --config.model.dtype=bfloat16
done
.venv/bin/python bench/profile_step.py --model $MINILM --batch_size 32 --seq_len 128 --warmup 0 --steps 1
rm -rf "$WORK"
