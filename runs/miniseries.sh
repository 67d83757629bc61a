#!/usr/bin/env bash
# A miniseries: one base model per depth, each trained compute-optimally (tokens = RATIO x scaling params), then one
# row per depth in <base>/<series>_miniseries_results/results.csv, read from the run's own checkpoint meta and metric
# log (scripts/scaling_analysis.py --add-run), and the analysis (scaling.md, bpb_vs_flops.png) beside it.
#   bash runs/miniseries.sh [series name, default today's date, e.g. nov30]      # 8 GPUs, d12 ... d26
#   CPU=1 bash runs/miniseries.sh toy                                              # toy version on this CPU
# Resumable: a depth with a row in the CSV is skipped; a depth that died continues from its newest checkpoint
# (--resume; set SAVE_EVERY to checkpoint along the way). Environment switches:
#   DEPTHS ("12 14 ... 26"; CPU: "1 2 3"), RATIO (tokens per scaling param, 12; CPU: 1), NPROC_PER_NODE (8; CPU: 1),
#   SAVE_EVERY (-1), SKIP_SETUP=1 (data and tokenizer already there), TRAIN_FLAGS (more base_train flags), WANDB_RUN.
# CPU=1 uses the embedded local corpus, a 1,024-token vocabulary and narrow models (aspect ratio 32, head dim 32,
# context 128, 1,024-token batches), about 10 minutes in all on 2 cores: a smoke test of the pipeline, not of scaling.
set -euo pipefail
cd "$(dirname "$0")/.."
SERIES="${1:-$(date +%b%d | tr '[:upper:]' '[:lower:]')}"
source runs/common.sh
if [ "${CPU:-0}" = 1 ]; then
    DEPTHS="${DEPTHS:-1 2 3}"; RATIO="${RATIO:-1}"; FLAGS="$CPU_FLAGS"
else
    DEPTHS="${DEPTHS:-12 14 16 18 20 22 24 26}"; RATIO="${RATIO:-12}"
    FLAGS="--core-metric-every=999999 --core-metric-max-per-task=-1"  # CORE once, at the end, on every example
fi
RESULTS_DIR="$NANOCHAT_BASE_DIR/${SERIES}_miniseries_results"
CSV="$RESULTS_DIR/results.csv"
mkdir -p "$RESULTS_DIR"

for d in $DEPTHS; do
    BATCH=""
    if [ "${CPU:-0}" != 1 ]; then  # rows per GPU that fit in 80 GB
        if [ "$d" -ge 28 ]; then BATCH="--device-batch-size=8"
        elif [ "$d" -ge 20 ]; then BATCH="--device-batch-size=16"; fi
    fi
    TAG="${SERIES}_miniseries_d${d}"
    train_and_record "$TAG" --depth=$d --target-param-data-ratio=$RATIO --model-tag=$TAG --run=${WANDB_RUN}_d$d \
        --sample-every=-1 --save-every=$SAVE_EVERY --resume $FLAGS $BATCH ${TRAIN_FLAGS:-}
done

python -m scripts.scaling_analysis --csv="$CSV"
