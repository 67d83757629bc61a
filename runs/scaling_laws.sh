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
source runs/common.sh
if [ "${CPU:-0}" = 1 ]; then
    BUDGETS="${BUDGETS:-3e10 1e11 3e11}"; DEPTHS="${DEPTHS:-1 2 3}"; FLAGS="$CPU_FLAGS"
else
    BUDGETS="${BUDGETS:-1e18 2.15e18 4.64e18 1e19}"; DEPTHS="${DEPTHS:-10 12 14 16 18 20}"
    FLAGS="--eval-tokens=$((100 * 524288)) --core-metric-every=999999 --core-metric-max-per-task=-1"
fi
RESULTS_DIR="$NANOCHAT_BASE_DIR/scaling_laws_results_${LABEL}"
CSV="$RESULTS_DIR/results.csv"
mkdir -p "$RESULTS_DIR"

for F in $BUDGETS; do
    for d in $DEPTHS; do
        BATCH=""
        if [ "${CPU:-0}" != 1 ] && [ "$d" -ge 20 ]; then BATCH="--device-batch-size=16"; fi
        TAG="scaling_${LABEL}_${F}_d${d}"
        train_and_record "$TAG" --depth=$d --target-flops=$F --target-param-data-ratio=-1 --model-tag=$TAG \
            --run=${WANDB_RUN}_${F}_d$d --sample-every=-1 --save-every=$SAVE_EVERY --resume \
            $FLAGS $BATCH ${TRAIN_FLAGS:-}
    done
done

python -m scripts.scaling_analysis --csv="$CSV"
