#!/usr/bin/env bash
# runs/speedrun.sh itself, on CPU in a few minutes, so a typo in it fails here and not after hours on 8 GPUs.
#   bash runs/speedrun_smoke.sh        (tests/test_speedrun_smoke.py runs it; SMOKE_DIR=dir keeps the artifacts there)
# Same lines, same flags: speedrun.sh appends env EXTRA_<stage> to each stage's flags and argparse keeps a repeated
# flag's last value, so every flag speedrun.sh passes is still parsed while the overrides below shrink the run:
# 2 gloo ranks (NPROC=2), depth 2, 128-token context, 2-3 steps per stage, no fp8 (CPU), offline (NANOCHAT_OFFLINE=1:
# CORE and the real chat datasets are reported as skipped, so the chat stages use the synthetic mixture), and the
# local corpus laid out as ClimbMix shards (all 170 + val present, so both `nanochat.dataset` lines fetch nothing).
# A checkpoint after every step, so that tests/test_speedrun_resume.py can kill it mid-stage and see it resume.
set -euo pipefail
cd "$(dirname "$0")/.."
SMOKE_DIR="${SMOKE_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/nanochat_smoke.XXXXXX")}"  # never the real artifact root
export NANOCHAT_BASE_DIR="$SMOKE_DIR" NANOCHAT_DATASET=climbmix NANOCHAT_OFFLINE=1 SKIP_SETUP=1 NPROC=2 WANDB_RUN=dummy
echo "speedrun smoke test in $SMOKE_DIR"

python -m nanochat.dataset --dataset local
mkdir -p "$SMOKE_DIR/base_data_climbmix"
for i in $(seq 0 169); do
    ln -sf "$SMOKE_DIR/base_data_local/shard_0000$((i % 9)).parquet" "$SMOKE_DIR/base_data_climbmix/$(printf 'shard_%05d.parquet' "$i")"
done
ln -sf "$SMOKE_DIR/base_data_local/shard_00009.parquet" "$SMOKE_DIR/base_data_climbmix/shard_06542.parquet"

export EXTRA_tok_train="--max-chars=1000000 --vocab-size=1024"
export EXTRA_base_train="--depth=2 --head-dim=64 --max-seq-len=128 --window-pattern=L --device-batch-size=2 \
    --total-batch-size=1024 --num-iterations=3 --eval-every=2 --eval-tokens=1024 --core-metric-every=-1 --no-fp8 \
    --save-every=1"
export EXTRA_base_eval="--device-batch-size=2 --split-tokens=1024 --max-per-task=2"
export EXTRA_chat_sft="--mixture=synthetic --num-iterations=2 --eval-every=1 --eval-tokens=1024 \
    --chat-eval-max-problems=2 --save-every=1"
export EXTRA_mid_train="$EXTRA_chat_sft --total-batch-size=1024"  # SFT sizes its own batch: 32 conversations
export EXTRA_chat_eval="-x 2 -m 8"
export EXTRA_chat_rl="--task=synthetic-math --num-iterations=1 --examples-per-step=2 --num-samples=2 --device-batch-size=2 \
    --max-new-tokens=8 --eval-every=-1 --eval-examples=2 --num-samples-eval=1"  # for when speedrun.sh's RL line is on
export EXTRA_chat_cli="-m 8"
bash runs/speedrun.sh
echo "speedrun smoke test passed ($SMOKE_DIR)"
