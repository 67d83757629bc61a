#!/usr/bin/env bash
# The reference run on one 8xH100 node: from nothing to a chat model and its report in a few hours.
#   bash runs/speedrun.sh            (WANDB_RUN=name to log to wandb; NPROC=8 GPUs)
# Install your CUDA build of torch (2.11-2.13) first; runs/setup.sh leaves it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export NANOCHAT_DATASET="${NANOCHAT_DATASET:-climbmix}"
WANDB_RUN="${WANDB_RUN:-dummy}"
NPROC="${NPROC:-8}"
bash runs/setup.sh
python -m nanochat.report reset

# data: 8 shards for the tokenizer now, the rest (~7B tokens for d24 at ratio 8) in the background
python -m nanochat.dataset -n 8
python -m nanochat.dataset -n 170 &
DATASET_PID=$!
python -m scripts.tok_train --max-chars=2000000000
python -m scripts.tok_eval
wait $DATASET_PID

# pretraining and base evaluation
torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_train -- --depth=24 --target-param-data-ratio=8 --device-batch-size=16 --fp8 --run=$WANDB_RUN
torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_eval -- --device-batch-size=16

# teach it to chat: mid-training, then SFT, evaluating each
torchrun --standalone --nproc_per_node=$NPROC -m scripts.mid_train -- --run=$WANDB_RUN
torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_eval -- -i mid
torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_sft -- --run=$WANDB_RUN
torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_eval -- -i sft

python -m nanochat.report generate
python -m scripts.chat_cli -i sft -p "Why is the sky blue?"
