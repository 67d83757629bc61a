#!/usr/bin/env bash
# The reference run on one 8xH100 node: from nothing to a chat model and its report in a few hours.
#   bash runs/speedrun.sh            (WANDB_RUN=name to log to wandb; NPROC=8 GPUs)
# Install your CUDA build of torch (2.11-2.13) first; runs/setup.sh leaves it alone (SKIP_SETUP=1 skips it).
# Each stage's flags end with $(extra NAME): the flags in env EXTRA_NAME (e.g. EXTRA_base_train="--save-every=1000"),
# appended, so they win (argparse keeps a repeated flag's last value) while every flag written here is still parsed.
# runs/speedrun_smoke.sh runs this very script that way on CPU in minutes: keep $(extra NAME) on every stage.
# Killed (node failure, spot reclaim, Ctrl-C)? Run the same command again: the report so far and a tokenizer made with
# the same flags are kept, a finished training stage says so and exits, the interrupted one resumes from its newest
# checkpoint (base_train saves every 30 minutes and on SIGTERM), and the rest runs. FRESH=1 starts over on purpose
# (--overwrite: the earlier run's checkpoints are deleted as each stage starts).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export NANOCHAT_DATASET="${NANOCHAT_DATASET:-climbmix}"
WANDB_RUN="${WANDB_RUN:-dummy}"
NPROC="${NPROC:-8}"
extra() { local name="EXTRA_$1"; echo "${!name:-}"; }
if [ "${FRESH:-0}" = 1 ]; then RESUME=--overwrite; OVERWRITE=--overwrite; else RESUME=--resume; OVERWRITE=; fi
if [ "${SKIP_SETUP:-0}" != 1 ]; then
    bash runs/setup.sh
    python -m pip install -q -e ".[gpu]"  # `kernels`: FA3 on Hopper; without it attention runs flex (slower)
fi
if [ -n "$OVERWRITE" ] || [ ! -f "$NANOCHAT_BASE_DIR/report/header.md" ]; then
    python -m nanochat.report reset $(extra report)
else
    echo "speedrun: continuing the report in $NANOCHAT_BASE_DIR/report (FRESH=1 starts over)"
fi

# data: 8 shards for the tokenizer now, the rest (~7B tokens for d24 at ratio 8) in the background
python -m nanochat.dataset -n 8 $(extra dataset)
python -m nanochat.dataset -n 170 $(extra dataset) &
DATASET_PID=$!
python -m scripts.tok_train --max-chars=2000000000 $OVERWRITE $(extra tok_train)
python -m scripts.tok_eval $(extra tok_eval)
wait $DATASET_PID

# pretraining and base evaluation
torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_train -- --depth=24 --target-param-data-ratio=8 --device-batch-size=16 --fp8 --run=$WANDB_RUN $RESUME $(extra base_train)
torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_eval -- --device-batch-size=16 $(extra base_eval)

# teach it to chat: mid-training (its identity conversations fetched once), then SFT, evaluating each
IDENTITY="$NANOCHAT_BASE_DIR/identity_conversations.jsonl"
if [ ! -f "$IDENTITY" ] && [ "${NANOCHAT_OFFLINE:-0}" != 1 ]; then
    curl -fL -o "$IDENTITY.tmp" https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl
    mv "$IDENTITY.tmp" "$IDENTITY"
fi
torchrun --standalone --nproc_per_node=$NPROC -m scripts.mid_train -- --run=$WANDB_RUN $RESUME $(extra mid_train)
torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_eval -- -i mid $(extra chat_eval)
torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_sft -- --run=$WANDB_RUN $RESUME $(extra chat_sft)
torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_eval -- -i sft $(extra chat_eval)

# optional, off as in karpathy/nanochat's speedrun.sh: RL on GSM8K (467 steps of 16 questions x 16 samples),
# then its GSM8K score.
# Its GPU cost is not measured yet; on the 2-core CPU a demo-sized step takes seconds (docs/perf.md).
# torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_rl -- --run=$WANDB_RUN $RESUME $(extra chat_rl)
# torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_eval -- -i rl -a GSM8K $(extra chat_eval)

python -m nanochat.report generate $(extra report)
python -m scripts.chat_cli -i sft -p "Why is the sky blue?" $(extra chat_cli)
