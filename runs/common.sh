# Sourced by runs/miniseries.sh and runs/scaling_laws.sh (not run on its own): their environment, the CPU toy's
# base_train flags, the corpus and tokenizer, and train_and_record, one training run turned into one CSV row.
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export OMP_NUM_THREADS=1
WANDB_RUN="${WANDB_RUN:-dummy}"
SAVE_EVERY="${SAVE_EVERY:--1}"
# --compile=0: on a busy 2-core machine compiling took minutes per run, longer than a toy run trains
CPU_FLAGS="--aspect-ratio=32 --head-dim=32 --max-seq-len=128 --window-pattern=L --device-batch-size=8 \
--total-batch-size=1024 --warmup-steps=10 --eval-every=1000000 --eval-tokens=16384 --core-metric-every=-1 --compile=0"
if [ "${CPU:-0}" = 1 ]; then
    export NANOCHAT_DATASET=local NANOCHAT_OFFLINE=1
    NPROC_PER_NODE=1; DATA_FLAGS="--dataset local"; TOK_FLAGS="--vocab-size=1024"
else
    NPROC_PER_NODE="${NPROC_PER_NODE:-8}"; DATA_FLAGS="-n 1000"; TOK_FLAGS="--max-chars=2000000000"
fi
if [ "${SKIP_SETUP:-0}" != 1 ]; then
    python -m nanochat.dataset $DATA_FLAGS
    python -m scripts.tok_train $TOK_FLAGS
fi

# train_and_record TAG BASE_TRAIN_ARGS...: skipped if TAG has a row in $CSV; else trains (log in $RESULTS_DIR/TAG.log,
# torchrun when NPROC_PER_NODE > 1) and appends TAG's row from its checkpoint meta and metric log. --resume: a run cut
# off by a crash continues from its newest checkpoint when the sweep is run again (one that finished says so).
train_and_record() {
    local tag="$1"; shift
    if [ -f "$CSV" ] && cut -d, -f1 "$CSV" | grep -qx "$tag"; then
        echo "$tag: already in $CSV, skipped"
        return
    fi
    local log="$RESULTS_DIR/$tag.log"
    if [ "$NPROC_PER_NODE" = 1 ]; then
        python -m scripts.base_train "$@" --resume 2>&1 | tee -a "$log"
    else
        torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" -m scripts.base_train -- "$@" --resume 2>&1 \
            | tee -a "$log"
    fi
    python -m scripts.scaling_analysis --add-run="$tag" --csv="$CSV"
}
