#!/usr/bin/env bash
# The reference run: train_mdlm.py's defaults on the challenge's FineWeb shards, 8 GPUs on one node.
# Any env var of train_mdlm.py set in the calling shell overrides its default, and NPROC_PER_NODE sets
# the number of GPUs (default 8).
set -euo pipefail
cd "$(dirname "$0")"
export DATA_PATH="${DATA_PATH:-./data/datasets/fineweb10B_sp1024}"
export TOKENIZER_PATH="${TOKENIZER_PATH:-./data/tokenizers/fineweb_1024_bpe.model}"
export RUN_ID="${RUN_ID:-mdlm_8xh100_$(date +%Y%m%d_%H%M%S)}"
torchrun --standalone --nproc_per_node="${NPROC_PER_NODE:-8}" train_mdlm.py
