#!/usr/bin/env bash
# Regenerate the committed CPU sample record: two seeds of the README's quick-start model, trained on
# the bundled FineWeb sample, written by RECORD_DIR into one folder. It shows what a record folder
# contains and is not a challenge result. A fixed ITERATIONS (no wallclock cap) keeps the step count
# and LR schedule independent of the machine's speed. Needs matplotlib for the PNG.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import matplotlib" 2>/dev/null || { echo "error: the record's PNG needs matplotlib: pip install matplotlib" >&2; exit 2; }
folder=records/track_non_record_16mb/2026-12-04_mdlm_cpu_sample
rm -rf "$folder"  # a record folder keeps the runs of one script, so start it afresh
for seed in 1337 42; do
  SEED=$seed RUN_ID=cpu_sample_record_seed$seed \
  DATA_PATH=./data/datasets/fineweb_sample_sp1024 TOKENIZER_PATH=./data/tokenizers/fineweb_1024_bpe.model \
  ITERATIONS=500 MAX_WALLCLOCK_SECONDS=0 VAL_LOSS_EVERY=100 TRAIN_LOG_EVERY=50 \
  NUM_LAYERS=4 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 UNET_SKIPS=2 LOOP_START=1 LOOP_END=2 \
  TRAIN_SEQ_LEN=128 TRAIN_BATCH_TOKENS=4096 EVAL_BATCH_TOKENS=16384 EVAL_METHOD=elbo,trap8 EVAL_PASSES=8 \
  SAMPLE_COUNT=3 SAMPLE_PROMPT="The city council" \
  RECORD_DIR="$folder" RECORD_NAME="MDLM CPU sample run" \
  RECORD_BLURB="Not a challenge result: a 4-block width-128 MDLM trained for 500 steps on the bundled FineWeb sample on a CPU, to show what a record folder contains." \
  python3 train_mdlm.py
done
