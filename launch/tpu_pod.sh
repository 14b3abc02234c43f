#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create it, copy this repository to every worker and
# install it there, run the same `python -m adapter_tuning.train ...` on all workers at once
# (one JAX process per worker host), then fetch the run folder from worker 0 (process 0
# writes metrics and the adapter artifact).
#
#   launch/tpu_pod.sh [OPTIONS] -- TRAIN_ARGS...
#   launch/tpu_pod.sh --name adapters-v4 --zone us-central2-b --type v4-32 \
#       -- --config configs/glue_mnli.py --workdir runs/mnli
#   launch/tpu_pod.sh --dry-run --name adapters-v4 --zone us-central2-b -- --config ... --workdir ...
#
# A base larger than one chip, e.g. XLM-R-XL (3.5B) on a v5e-16 slice: split the frozen base
# over all 16 chips (mesh.fsdp; each process reads only its chips' slices of the weights).
# bench/memory.py expects per chip 0.90 GiB of params, 0.18 GiB of Adam state and a 2.1 GiB
# peak at batch 32 x 128 (launch/README.md, "Large bases"):
#   launch/tpu_pod.sh --name xlmr-xl --zone us-west4-a --type v5litepod-16 \
#       --version v2-alpha-tpuv5-lite -- --config configs/glue_mnli.py --workdir runs/mnli_xl \
#       --config.model.checkpoint=/mnt/shared/xlm-roberta-xl --config.mesh.fsdp=16 \
#       --config.model.dtype=bfloat16 --config.model.scan_layers=true --config.model.remat=full
#
# Options (each also an environment variable):
#   --name NAME      TPU_NAME         TPU VM name (required)
#   --zone ZONE      TPU_ZONE         zone (required), e.g. us-central2-b
#   --type TYPE      TPU_TYPE         accelerator type (default v4-32: 4 workers)
#   --version V      TPU_VERSION      TPU VM image (default tpu-ubuntu2204-base)
#   --project P      TPU_PROJECT      Google Cloud project (default: gcloud's configured one)
#   --spot           TPU_SPOT=1       create a Spot TPU (pre-emptible; rerun to resume)
#   --steps LIST     TPU_STEPS        comma-separated, in this order: create,copy,install,train,
#                                     fetch,delete (default: create,copy,install,train,fetch)
#   --remote-dir D   TPU_REMOTE_DIR   repository folder on the workers (default adapter_tuning,
#                                     relative to the home folder)
#   --results D      TPU_RESULTS      local folder for worker 0's run folder (default: --workdir)
#   --python P       TPU_PYTHON       Python 3.11 on the workers (default python3.11; the
#                                     install step apt-installs python3.11-venv if needed)
#   --dry-run                         print the commands instead of running them
#
# The workdir is relative to the remote repository. Checkpoints are written by every worker:
# to resume after a pre-emption, put the workdir on storage all workers share (an NFS or
# gcsfuse mount); the fetched copy leaves checkpoints/ out.
set -euo pipefail

NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
TYPE=${TPU_TYPE:-v4-32}
VERSION=${TPU_VERSION:-tpu-ubuntu2204-base}
PROJECT=${TPU_PROJECT:-}
SPOT=${TPU_SPOT:-0}
STEPS=${TPU_STEPS:-create,copy,install,train,fetch}
REMOTE_DIR=${TPU_REMOTE_DIR:-adapter_tuning}
RESULTS=${TPU_RESULTS:-}
PY=${TPU_PYTHON:-python3.11}
DRY_RUN=0
REPO=$(cd "$(dirname "$0")/.." && pwd)

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME=${2:?}; shift 2 ;;
    --zone) ZONE=${2:?}; shift 2 ;;
    --type) TYPE=${2:?}; shift 2 ;;
    --version) VERSION=${2:?}; shift 2 ;;
    --project) PROJECT=${2:?}; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --steps) STEPS=${2:?}; shift 2 ;;
    --remote-dir) REMOTE_DIR=${2:?}; shift 2 ;;
    --results) RESULTS=${2:?}; shift 2 ;;
    --python) PY=${2:?}; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (the training arguments go after --); see $0 --help" ;;
  esac
done
TRAIN_ARGS=("$@")

[[ -n "$NAME" ]] || die "--name (or TPU_NAME) is required: the TPU VM's name"
[[ -n "$ZONE" ]] || die "--zone (or TPU_ZONE) is required, e.g. us-central2-b"
WORKDIR=
for ((i = 0; i < ${#TRAIN_ARGS[@]}; i++)); do
  case "${TRAIN_ARGS[i]}" in
    --workdir=*) WORKDIR=${TRAIN_ARGS[i]#--workdir=} ;;
    --workdir) WORKDIR=${TRAIN_ARGS[i + 1]:-} ;;
  esac
done
if [[ ",$STEPS," == *,train,* || ",$STEPS," == *,fetch,* ]]; then
  [[ -n "$WORKDIR" ]] || die "give the training arguments after --, with --workdir, e.g. -- --config configs/glue_mnli.py --workdir runs/mnli"
fi
for step in ${STEPS//,/ }; do
  case "$step" in create|copy|install|train|fetch|delete) ;;
    *) die "unknown step '$step' in --steps; use create,copy,install,train,fetch,delete" ;;
  esac
done
RESULTS=${RESULTS:-$WORKDIR}

# Shell-quote one word only where needed, so printed commands read well and paste back.
q() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"
  elif [[ "$1" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then  # --flag='value'
    printf '%s' "${BASH_REMATCH[1]}"; q "${BASH_REMATCH[2]}"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
qall() { local out= w; for w in "$@"; do out+="${out:+ }$(q "$w")"; done; printf '%s' "$out"; }

run() {  # run a command, or print it with --dry-run
  if [[ $DRY_RUN == 1 ]]; then qall "$@"; echo; else "$@"; fi
}
run_sh() {  # run a shell snippet (pipes), or print it
  if [[ $DRY_RUN == 1 ]]; then echo "$1"; else bash -c "$1"; fi
}

GC=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")
remote() {  # remote WORKER COMMAND: run COMMAND on one worker (0) or all
  run "${GC[@]}" ssh "$NAME" "${WHERE[@]}" --worker="$1" --command="$2"
}

SRC_TGZ=/tmp/adapter_tuning_src_$NAME.tgz
OUT_TGZ=/tmp/adapter_tuning_results_$NAME.tgz
JAX_VERSION=$(sed -n 's/^jax==//p' "$REPO/requirements.txt")
RD=$(q "$REMOTE_DIR")

for step in ${STEPS//,/ }; do
  case "$step" in
    create)
      args=("${GC[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$TYPE" --version="$VERSION")
      [[ $SPOT == 1 ]] && args+=(--spot)
      run "${args[@]}" ;;
    copy)  # tracked and untracked-but-not-ignored files: no .venv, no runs
      run_sh "git -C $(q "$REPO") ls-files -z --cached --others --exclude-standard | tar -czf $(q "$SRC_TGZ") -C $(q "$REPO") --null --ignore-failed-read -T -"
      run "${GC[@]}" scp "$SRC_TGZ" "$NAME:adapter_tuning_src.tgz" "${WHERE[@]}" --worker=all
      remote all "mkdir -p $RD && tar -xzf adapter_tuning_src.tgz -C $RD" ;;
    install)
      venv="$(q "$PY") -m venv --clear .venv"
      remote all "cd $RD && ($venv || (sudo apt-get update -qq && sudo apt-get install -y -qq python3.11-venv && $venv)) && .venv/bin/pip install -q -r requirements.txt $(q "jax[tpu]==$JAX_VERSION")" ;;
    train)  # the same command on every worker; jax.distributed finds the pod by itself
      remote all "cd $RD && .venv/bin/python -m adapter_tuning.train --distributed $(qall "${TRAIN_ARGS[@]}")" ;;
    fetch)  # worker 0 = process 0 holds metrics.jsonl, config.json and adapter/
      remote 0 "cd $RD && tar -czf adapter_tuning_results.tgz --exclude=./checkpoints -C $(q "$WORKDIR") ."
      run "${GC[@]}" scp "$NAME:$REMOTE_DIR/adapter_tuning_results.tgz" "$OUT_TGZ" "${WHERE[@]}" --worker=0
      run mkdir -p "$RESULTS"
      run tar -xzf "$OUT_TGZ" -C "$RESULTS" ;;
    delete)
      run "${GC[@]}" delete "$NAME" "${WHERE[@]}" --quiet ;;
  esac
done
