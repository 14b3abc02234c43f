#!/usr/bin/env bash
# The PEFT-methods sitting: per method, AdapterHub's train step then ours, alternating, one
# process each (so each peak RSS is that method's); then the merged-LoRA inference check.
#   bash bench/methods.sh [ROUNDS] > results.jsonl
#   .venv/bin/python bench/methods_table.py results.jsonl
# Defaults: BERT-base geometry (random weights), batch 32 x 128, 4 timed steps after 1
# warm-up. Overrides for smoke tests: MODEL=tiny BATCH=4 SEQ=16 STEPS=1 WARMUP=1
# METHODS="lora mam" INFER_ROUNDS=1 INFER_REPS=1 (MODEL may also be a checkpoint dir, e.g. from
# bench/family_checkpoints.py; INFER_ROUNDS=0 skips the inference check).
# Needs ../peer-venv (../shared/bench/README.md) and the project's .venv. A run that fails
# prints an {"error": ...} line and the sitting goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-1}
MODEL=${MODEL:-bert-base}
BATCH=${BATCH:-32}
SEQ=${SEQ:-128}
STEPS=${STEPS:-4}
WARMUP=${WARMUP:-1}
METHODS=${METHODS:-"houlsby pfeiffer parallel lora ia3 prefix mam bitfit full"}
PEER_PY=${PEER_PY:-../peer-venv/bin/python}
OURS_PY=${OURS_PY:-.venv/bin/python}
COMMON=(--model "$MODEL" --batch_size "$BATCH" --seq_len "$SEQ" --steps "$STEPS" --warmup "$WARMUP")

run() {  # $1 = tool name for the error line, $2 = method, rest = the command; its JSON lines
  local tool=$1 method=$2 out
  shift 2
  if out=$("$@" 2>/dev/null | grep '^{') && [ -n "$out" ]; then
    echo "$out"
  else
    echo "{\"tool\": \"$tool\", \"method\": \"$method\", \"round\": $round, \"error\": \"run failed\"}"
  fi
}

round=0
python3 bench/method_specs.py  # header: CPU model and flags, date
for round in $(seq "$ROUNDS"); do
  for method in $METHODS; do
    run adapterhub "$method" "$PEER_PY" bench/peer_methods.py --method "$method" "${COMMON[@]}"
    run adapter_tuning "$method" "$OURS_PY" bench/train_step.py --method "$method" "${COMMON[@]}"
  done
done
INFER_MODEL=$MODEL
[ -d "$MODEL" ] && INFER_MODEL=bert-base  # merged_inference builds random geometries only
[ "${INFER_ROUNDS:-5}" = 0 ] || run adapter_tuning merged_inference "$OURS_PY" bench/merged_inference.py --model "$INFER_MODEL" \
  --batch_size "$BATCH" --seq_len "$SEQ" --rounds "${INFER_ROUNDS:-5}" --reps "${INFER_REPS:-3}"
