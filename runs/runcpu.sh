#!/usr/bin/env bash
# The CPU demo: the whole pipeline, offline, on a laptop-class CPU in well under half an hour.
#   bash runs/runcpu.sh
# Tokenizer on the embedded corpus -> tiny base model -> base eval -> mid-training and SFT on the synthetic
# chat tasks -> chat eval -> RL on the synthetic arithmetic -> chat eval -> report -> one chat answer. The model is
# tiny, so expect it to have learned the formats and some of the synthetic skills (printed against chance), not to be
# clever.
# Artifacts go to $NANOCHAT_BASE_DIR (default ~/.cache/nanochat); set it to keep demo runs apart.
# Interrupted? Run it again: finished stages are kept, the interrupted one resumes (FRESH=1 starts over).
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
export NANOCHAT_DATASET=local   # the embedded corpus; see README for real data
export NANOCHAT_OFFLINE=1       # never wait on the network: real datasets and the CORE bundle are reported as skipped
export WANDB_RUN="${WANDB_RUN:-dummy}"
# Sized so the whole script stays well under 30 minutes on a 2-core machine; raise these on a bigger CPU.
DEPTH="${DEPTH:-4}"
BASE_STEPS="${BASE_STEPS:-200}"
CHAT_STEPS="${CHAT_STEPS:-150}"
RL_STEPS="${RL_STEPS:-30}"
if [ "${FRESH:-0}" = 1 ]; then RESUME=--overwrite; OVERWRITE=--overwrite; else RESUME=--resume; OVERWRITE=; fi

if [ -n "$OVERWRITE" ] || [ ! -f "${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}/report/header.md" ]; then
    python -m nanochat.report reset
fi

# 1. data and tokenizer (vocab 8,192: a tiny model spends less of its compute on the embedding and lm_head)
python -m nanochat.dataset --dataset local
python -m scripts.tok_train --vocab-size=8192 $OVERWRITE
python -m scripts.tok_eval

# 2. pretraining: depth 4 (width 256, 4 heads of 64), 256-token context, 4K-token batches; then bpb and samples
python -m scripts.base_train --depth=$DEPTH --head-dim=64 --max-seq-len=256 --window-pattern=L \
    --device-batch-size=16 --total-batch-size=4096 --num-iterations=$BASE_STEPS \
    --eval-every=50 --eval-tokens=32768 --core-metric-every=-1 --sample-every=$BASE_STEPS --run=$WANDB_RUN $RESUME
python -m scripts.base_eval --device-batch-size=16 --split-tokens=32768

# 3. teach it to chat on the synthetic tasks (identity, calculator arithmetic, spelling, multiple choice),
#    evaluating each stage on their held-out test splits against chance
python -m scripts.mid_train --mixture=synthetic --total-batch-size=4096 --num-iterations=$CHAT_STEPS --eval-every=50 \
    --eval-tokens=16384 --chat-eval-every=0 --run=$WANDB_RUN $RESUME
python -m scripts.chat_eval -i mid -x 50 -m 64
python -m scripts.chat_sft --mixture=synthetic --num-iterations=$((CHAT_STEPS / 3)) --eval-every=25 \
    --eval-tokens=16384 --chat-eval-every=0 --run=$WANDB_RUN $RESUME
python -m scripts.chat_eval -i sft -x 50 -m 64

# 4. reinforcement learning on the synthetic arithmetic (reward 1 for the right "#### N"): 4 questions x 8 samples per
#    step; pass@1..4 on 50 held-out problems before and after, then the same chat evaluation as SFT's (SynthMath row)
python -m scripts.chat_rl --task=synthetic-math --num-iterations=$RL_STEPS --examples-per-step=4 --num-samples=8 \
    --device-batch-size=8 --max-new-tokens=64 --eval-every=-1 --eval-examples=50 --num-samples-eval=4 \
    --run=$WANDB_RUN $RESUME
python -m scripts.chat_eval -i rl -x 50 -m 64

# 5. the report card, then talk to it
python -m nanochat.report generate
python -m scripts.chat_cli -i sft -p "What is your name?"
echo
echo "Chat with it in the browser: python -m scripts.chat_web -i sft   (then open http://127.0.0.1:8000/)"
