#!/usr/bin/env bash
# Evaluate a OneFormer3D checkpoint (baseline or InfluencerCriterion run) on S3DIS Area-5 or ScanNet val.
#
#   scripts/eval_oneformer3d.sh {s3dis|scannet} {baseline|influencerformer} [CKPT] [TEST_ARGS...]
#
#   CKPT        default: the last checkpoint of the run ($ONEFORMER3D_ROOT/work_dirs/<config name>/last_checkpoint,
#               written by mmengine)
#   TEST_ARGS   passed to OneFormer3D's tools/test.py, e.g. --cfg-options model.test_cfg.topk_insts=300
#
# Environment: ONEFORMER3D_ROOT, GPUS, PORT, PYTHON, DRY_RUN as in train_oneformer3d.sh, and
#   SPCONV_FIX  1 (default): OneFormer3D reshapes the spconv backbone weights between training and testing (its
#               README); the script writes CKPT's converted copy <CKPT stem>_test.pth with its
#               tools/fix_spconv_checkpoint.py and evaluates that, leaving CKPT resumable. 0: CKPT is already
#               converted (OneFormer3D's released checkpoints, or a *_test.pth written here before).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/train_oneformer3d.sh"

# last_checkpoint CONFIG -> the checkpoint mmengine recorded for that run (absolute)
last_checkpoint() {
  local work_dir="$ONEFORMER3D_ROOT/work_dirs/$(basename "$1" .py)" ckpt
  [[ -f "$work_dir/last_checkpoint" ]] || die "no CKPT given and no $work_dir/last_checkpoint: train first or pass CKPT"
  ckpt=$(<"$work_dir/last_checkpoint")
  [[ "$ckpt" == /* ]] || ckpt="$ONEFORMER3D_ROOT/${ckpt#./}"
  echo "$ckpt"
}

eval_main() {
  [[ $# -ge 2 ]] || die "usage: $0 {s3dis|scannet} {baseline|influencerformer} [CKPT] [TEST_ARGS...]"
  local config variant=$2 ckpt=""
  config=$(config_path "$1" "$2")
  shift 2
  if [[ $# -gt 0 && "$1" != -* ]]; then
    [[ -f "$1" ]] || die "checkpoint not found: $1"
    ckpt="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
    shift
  fi
  check_gpus
  find_oneformer3d
  [[ -n "$ckpt" ]] || ckpt=$(last_checkpoint "$config")
  [[ "${DRY_RUN:-0}" == 1 ]] || check_environment "$variant" "$config"
  if [[ "${SPCONV_FIX:-1}" == 1 ]]; then
    local fixed="${ckpt%.pth}_test.pth"
    echo "+ $PYTHON tools/fix_spconv_checkpoint.py --in-path $ckpt --out-path $fixed"
    if [[ "${DRY_RUN:-0}" != 1 ]]; then
      (cd "$ONEFORMER3D_ROOT" && "$PYTHON" tools/fix_spconv_checkpoint.py --in-path "$ckpt" --out-path "$fixed")
    fi
    ckpt=$fixed
  fi
  if (( ${GPUS:-1} > 1 )); then
    export PORT=${PORT:-29500}
    if [[ -f "$ONEFORMER3D_ROOT/tools/dist_test.sh" ]]; then
      run_or_print bash tools/dist_test.sh "$config" "$ckpt" "$GPUS" "$@"
    else
      run_or_print "$PYTHON" -m torch.distributed.run --nproc_per_node="$GPUS" --master_port="$PORT" \
        tools/test.py "$config" "$ckpt" "$@" --launcher pytorch
    fi
  else
    run_or_print "$PYTHON" tools/test.py "$config" "$ckpt" "$@"
  fi
}

eval_main "$@"
