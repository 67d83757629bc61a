#!/usr/bin/env bash
# Scaling laws: every depth at every training-FLOPs budget (--target-flops sets the steps), one row per run in
# <base>/scaling_laws_results_<label>/results.csv from the run's own checkpoint meta and metric log, then the
# IsoFLOP analysis beside it (scaling.md, isoflop.png, bpb_vs_flops.png; scripts/scaling_analysis.py).
#   bash runs/scaling_laws.sh [label, default today's date, e.g. nov30]      # 8 GPUs, budgets 1e18 ... 1e19
#   CPU=1 bash runs/scaling_laws.sh toy                                    # toy version on this CPU
# Resumable: a run with a row in the CSV is skipped; one that died continues from its newest checkpoint (--resume;
# set SAVE_EVERY to checkpoint along the way). Environment switches:
#   BUDGETS ("1e18 2.15e18 4.64e18 1e19"; CPU: "3e10 1e11 3e11"), DEPTHS ("10 12 ... 20"; CPU: "1 2 3"),
#   NPROC_PER_NODE (8; CPU: 1), SAVE_EVERY (-1), SKIP_SETUP=1, TRAIN_FLAGS (more base_train flags), WANDB_RUN.
# CPU=1: local corpus, 1,024-token vocabulary, narrow models (as runs/miniseries.sh), about 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
LABEL="${1:-$(date +%b%d | tr '[:upper:]' '[:lower:]')}"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export OMP_NUM_THREADS=1
WANDB_RUN="${WANDB_RUN:-dummy}"
SAVE_EVERY="${SAVE_EVERY:--1}"
if [ "${CPU:-0}" = 1 ]; then
    export NANOCHAT_DATASET=local NANOCHAT_OFFLINE=1
    BUDGETS="${BUDGETS:-3e10 1e11 3e11}"; DEPTHS="${DEPTHS:-1 2 3}"; NPROC_PER_NODE=1
    FLAGS="--aspect-ratio=32 --head-dim=32 --max-seq-len=128 --window-pattern=L --device-batch-size=8 \
--total-batch-size=1024 --warmup-steps=10 --eval-every=1000000 --eval-tokens=16384 --core-metric-every=-1 --compile=0"
    # --compile=0: on a busy 2-core machine compiling took minutes per run, longer than a toy run trains
else
    BUDGETS="${BUDGETS:-1e18 2.15e18 4.64e18 1e19}"; DEPTHS="${DEPTHS:-10 12 14 16 18 20}"
    NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
    FLAGS="--eval-tokens=$((100 * 524288)) --core-metric-every=999999 --core-metric-max-per-task=-1"
fi
RESULTS_DIR="$NANOCHAT_BASE_DIR/scaling_laws_results_${LABEL}"
CSV="$RESULTS_DIR/results.csv"
mkdir -p "$RESULTS_DIR"

if [ "${SKIP_SETUP:-0}" != 1 ]; then
    if [ "${CPU:-0}" = 1 ]; then
        python -m nanochat.dataset --dataset local
        python -m scripts.tok_train --vocab-size=1024
    else
        python -m nanochat.dataset -n 1000
        python -m scripts.tok_train --max-chars=2000000000
    fi
fi

for F in $BUDGETS; do
    for d in $DEPTHS; do
        TAG="scaling_${LABEL}_${F}_d${d}"
        if [ -f "$CSV" ] && cut -d, -f1 "$CSV" | grep -qx "$TAG"; then
            echo "$TAG: already in $CSV, skipped"
            continue
        fi
        BATCH=""
        if [ "${CPU:-0}" != 1 ] && [ "$d" -ge 20 ]; then BATCH="--device-batch-size=16"; fi
        ARGS="--depth=$d --target-flops=$F --target-param-data-ratio=-1 --model-tag=$TAG --run=${WANDB_RUN}_${F}_d$d \
--sample-every=-1 --save-every=$SAVE_EVERY --resume $FLAGS $BATCH ${TRAIN_FLAGS:-}"
        if [ "$NPROC_PER_NODE" = 1 ]; then
            python -m scripts.base_train $ARGS 2>&1 | tee "$RESULTS_DIR/$TAG.log"
        else
            torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" -m scripts.base_train -- $ARGS 2>&1 | tee "$RESULTS_DIR/$TAG.log"
        fi
        python -m scripts.scaling_analysis --add-run="$TAG" --csv="$CSV"
    done
done

python -m scripts.scaling_analysis --csv="$CSV"
