#!/usr/bin/env bash
# Every GPU measurement of the project in one command (issue 19 §4), sized to finish in 8 minutes on one H100:
#   1. tests     pytest -m cuda: each criterion on CUDA equals its CPU result, bf16 autocast is finite, the
#                transport loss makes no host sync (torch.cuda.set_sync_debug_mode("error"))
#   2. bench     loss forward + backward at B 8, Q 200, K 50, 10 supervised layers: HF Mask2FormerLoss vs ours,
#                random and trained-like inputs, peak memory
#   3. steps     the whole training step on the crowded recipe, Hungarian vs transport, ~200 steps each:
#                median ms/step and the assignment share (benchmarks/step_times.py)
#   4. compare   a short crowded compare (hungarian vs influencer, seed 0), as many steps as fit in the time left
# Everything lands in one folder: one log per stage, stages.md (exit status and seconds of each) and summary.md.
#
#   scripts/gpu_check.sh                              # on the GPU machine (device cuda)
#   scripts/gpu_check.sh --out runs/gpu_check_h100    # choose the folder (default runs/gpu_check_<date>)
#   scripts/gpu_check.sh --device cpu --smoke         # every stage on tiny sizes: checks the script itself (CI)
#
# A stage that fails or runs out of its time does not stop the others; the exit status is 1 if any failed.
# Environment: PYTHON (default .venv/bin/python if present, else python3), GPU_CHECK_BUDGET_S (default 470).
set -uo pipefail

DEVICE=cuda
SMOKE=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --smoke) SMOKE=1; shift ;;
        --out) OUT="$2"; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT="${OUT:-runs/gpu_check_$(date +%Y%m%d_%H%M%S)}"
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-470}   # seconds for all stages; 8 min minus a margin for start-up
FAILED=0

if [ "$SMOKE" = 1 ]; then
    # tiny data and schedule: the crowded model and losses, 8 training images, a few steps
    SETS=(--set data.num_train=8 --set data.num_val=2 --set data.batch_size=2 --set data.workers=0
          --set train.probe_images=2)
    BENCH_ARGS=(--quick --device "$DEVICE")
    STEPS=2; SKIP=0; FIT_ARGS=(--multiple 1 --minimum 2); FALLBACK_STEPS=2
else
    SETS=(--set data.num_val=32)
    BENCH_ARGS=(--device "$DEVICE" --batch 8 --queries 200 --instances 50 --layers 9)
    STEPS=200; SKIP=10; FIT_ARGS=(--multiple 50 --minimum 50); FALLBACK_STEPS=300
fi
CROWDED=(--config configs/shapes2d_crowded.yaml --device "$DEVICE")

remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }

# stage NAME LIMIT_S CMD...: run CMD with output in $OUT/NAME.log, at most LIMIT_S seconds (or what is left)
stage() {
    local name="$1" limit="$2"; shift 2
    local left; left=$(remaining)
    if [ "$SMOKE" = 0 ] && [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -le 0 ]; then
        echo "| $name | skipped: no time left | 0 |" >> "$OUT/stages.md"; FAILED=1; return 1
    fi
    echo "[gpu_check] $name (limit ${limit} s): $*"
    local t0 rc; t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    local status=$rc
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="$rc (timed out)"; fi
    echo "| $name | $status | $(( $(date +%s) - t0 )) |" >> "$OUT/stages.md"
    if [ $rc -ne 0 ]; then FAILED=1; echo "[gpu_check] $name failed ($status): see $OUT/$name.log"; fi
    return $rc
}

printf '| stage | exit status | seconds |\n|---|---|---|\n' > "$OUT/stages.md"

# 0. what ran where
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) ($(git status --porcelain 2>/dev/null | wc -l) changed files)"
    echo "mode: device $DEVICE, smoke $SMOKE, budget ${BUDGET} s"
    echo "host: $(getconf _NPROCESSORS_ONLN) CPU cores, load average $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1

# 1. CUDA tests (skipped, and passing, without a GPU)
stage tests 100 "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py --junitxml "$OUT/tests.xml"

# 2. loss speed, HF vs ours, peak memory
stage bench 110 "$PYTHON" -m influencerformer bench -- "${BENCH_ARGS[@]}"

# 3. whole training steps on the crowded recipe, every step logged
for criterion in hungarian influencer; do
    stage "steps_$criterion" 110 "$PYTHON" -m influencerformer train "${CROWDED[@]}" --seed 0 --criterion "$criterion" \
        --steps "$STEPS" --out "$OUT/steps/$criterion" "${SETS[@]}" --set train.log_every=1 \
        --set train.eval_every=0 --set train.checkpoint_every=0 --set train.progress=false
done
stage steps_table 30 "$PYTHON" benchmarks/step_times.py --skip "$SKIP" "$OUT/steps/hungarian" "$OUT/steps/influencer"

# 4. short crowded compare: as many steps as fit in the time left (two runs, ~40 s set-up and evaluation each)
COMPARE_STEPS=$FALLBACK_STEPS
if [ "$SMOKE" = 0 ]; then
    FIT=$("$PYTHON" benchmarks/step_times.py --skip "$SKIP" "$OUT/steps/hungarian" "$OUT/steps/influencer" \
          --fit $(( $(remaining) - 100 )) "${FIT_ARGS[@]}" 2>/dev/null) && COMPARE_STEPS=$FIT
fi
EVAL_EVERY=$(( SMOKE == 1 ? COMPARE_STEPS : COMPARE_STEPS / 2 ))
echo "compare steps: $COMPARE_STEPS (evaluated every $EVAL_EVERY)" >> "$OUT/env.txt"
stage compare 600 "$PYTHON" -m influencerformer compare "${CROWDED[@]}" --seeds 0 --criteria hungarian influencer \
    --steps "$COMPARE_STEPS" --eval-every "$EVAL_EVERY" \
    --out "$OUT/compare" "${SETS[@]}" --set train.progress=false

# summary: everything a reader needs, in one file
{
    echo "# GPU check ($( [ "$SMOKE" = 1 ] && echo 'smoke, ')device $DEVICE)"
    echo; echo '```'; cat "$OUT/env.txt"; echo '```'
    echo; echo "## Stages (total $(( $(date +%s) - START )) s)"; echo; cat "$OUT/stages.md"
    echo; echo "## Loss speed (bench)"; echo; grep -v '^\[' "$OUT/bench.log" 2>/dev/null | tail -n 20
    echo; echo "## Training step, crowded recipe"; echo; cat "$OUT/steps_table.log" 2>/dev/null
    echo; echo "## Short crowded compare ($COMPARE_STEPS steps)"; echo
    if [ -f "$OUT/compare/report.md" ]; then cat "$OUT/compare/report.md"; else echo "(no report: see compare.log)"; fi
} > "$OUT/summary.md"
echo "[gpu_check] wrote $OUT/summary.md ($(( $(date +%s) - START )) s, $( [ $FAILED = 0 ] && echo 'all stages passed' || echo 'some stages FAILED'))"
exit $FAILED
