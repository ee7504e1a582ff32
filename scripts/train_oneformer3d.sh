#!/usr/bin/env bash
# Train OneFormer3D with its own Hungarian criterion (baseline) or with InfluencerCriterion, on S3DIS or ScanNet.
#
#   scripts/train_oneformer3d.sh {s3dis|scannet} {baseline|influencerformer} [--resume [CKPT]] [TRAIN_ARGS...]
#
#   --resume          continue from the latest checkpoint of the work directory
#   --resume CKPT     continue from CKPT (model, optimizer, scheduler, epoch)
#   TRAIN_ARGS        passed to OneFormer3D's tools/train.py, e.g. --amp, --cfg-options key=value
#
# Environment:
#   ONEFORMER3D_ROOT  checkout of https://github.com/filaPro/oneformer3d (default: ../oneformer3d beside this repo);
#                     it holds data/ and work_dirs/ (paths in OneFormer3D's configs are relative to it)
#   GPUS              GPUs on this node (default 1); > 1 launches OneFormer3D's tools/dist_train.sh when it has one,
#                     else torch.distributed.run with --launcher pytorch (what mmdet3d's dist_train.sh runs)
#   PORT              rendezvous port when GPUS > 1 (default 29500)
#   PYTHON            interpreter of OneFormer3D's environment (default: python)
#   DRY_RUN=1         print the command instead of checking the environment and running it
# Checkpoints and logs: $ONEFORMER3D_ROOT/work_dirs/<config name>/.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}

die() { echo "error: $*" >&2; exit 1; }

# config_path DATASET VARIANT -> absolute path of our config for that run
config_path() {
  local stem
  case "$1" in
    s3dis) stem=1xb2_s3dis-area-5 ;;
    scannet) stem=1xb4_scannet ;;
    *) die "dataset must be s3dis or scannet, got '$1'" ;;
  esac
  case "$2" in
    baseline) echo "$REPO/configs/$1/oneformer3d_$stem.py" ;;
    influencerformer) echo "$REPO/configs/$1/influencerformer_$stem.py" ;;
    *) die "variant must be baseline or influencerformer, got '$2'" ;;
  esac
}

# find_oneformer3d: export ONEFORMER3D_ROOT (absolute) and a PYTHONPATH with OneFormer3D and this repository
find_oneformer3d() {
  local root=${ONEFORMER3D_ROOT:-$REPO/../oneformer3d}
  if [[ ! -f "$root/tools/train.py" || ! -d "$root/configs" ]]; then
    die "OneFormer3D not found at '$root' (expected tools/train.py and configs/). Clone it beside this repository:
  git clone https://github.com/filaPro/oneformer3d $(dirname "$REPO")/oneformer3d
or point to your checkout: export ONEFORMER3D_ROOT=/path/to/oneformer3d"
  fi
  ONEFORMER3D_ROOT=$(cd "$root" && pwd)
  export ONEFORMER3D_ROOT
  export PYTHONPATH="$ONEFORMER3D_ROOT:$REPO${PYTHONPATH:+:$PYTHONPATH}"
}

# check_environment VARIANT CONFIG: the training stack imports (and, for ours, the criterion builds and runs)
check_environment() {
  local out
  if [[ "$1" == influencerformer ]]; then
    out=$("$PYTHON" "$REPO/scripts/register_criterion.py" --verify --full --config "$2" 2>&1) || die "${out##*$'\n'}"
  else
    out=$("$PYTHON" "$REPO/scripts/register_criterion.py" --stack 2>&1) || die "${out##*$'\n'}"
  fi
  echo "${out##*$'\n'}"
}

# check_gpus: GPUS must be a positive integer
check_gpus() {
  [[ "${GPUS:-1}" =~ ^[1-9][0-9]*$ ]] || die "GPUS must be a positive integer, got '${GPUS}'"
}

# run_or_print CMD...: run from ONEFORMER3D_ROOT, or print it when DRY_RUN=1
run_or_print() {
  echo "+ (cd $ONEFORMER3D_ROOT && $*)"
  if [[ "${DRY_RUN:-0}" != 1 ]]; then
    cd "$ONEFORMER3D_ROOT"
    exec "$@"
  fi
}

train_main() {
  [[ $# -ge 2 ]] || die "usage: $0 {s3dis|scannet} {baseline|influencerformer} [--resume [CKPT]] [TRAIN_ARGS...]"
  local config variant=$2
  config=$(config_path "$1" "$2")
  shift 2
  local resume=()
  if [[ "${1:-}" == --resume ]]; then
    shift
    if [[ $# -gt 0 && "$1" != -* ]]; then
      [[ -f "$1" ]] || die "checkpoint to resume from not found: $1"
      resume=(--resume "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")")  # absolute: the run starts elsewhere
      shift
    else
      resume=(--resume)  # tools/train.py: latest checkpoint of the work directory
    fi
  fi
  check_gpus
  find_oneformer3d
  [[ "${DRY_RUN:-0}" == 1 ]] || check_environment "$variant" "$config"
  local args=("$config" ${resume[@]+"${resume[@]}"} "$@")
  if (( ${GPUS:-1} > 1 )); then
    export PORT=${PORT:-29500}
    if [[ -f "$ONEFORMER3D_ROOT/tools/dist_train.sh" ]]; then
      run_or_print bash tools/dist_train.sh "$config" "$GPUS" ${resume[@]+"${resume[@]}"} "$@"
    else
      run_or_print "$PYTHON" -m torch.distributed.run --nproc_per_node="$GPUS" --master_port="$PORT" \
        tools/train.py "${args[@]}" --launcher pytorch
    fi
  else
    run_or_print "$PYTHON" tools/train.py "${args[@]}"
  fi
}

# Sourced by eval_oneformer3d.sh for the helpers above; run directly, it trains.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  train_main "$@"
fi
