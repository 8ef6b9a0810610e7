"""The benchmark beside the script runs on the CPU and prints every figure."""

from __future__ import annotations

import math
import subprocess
import sys

from conftest import REPO, parse_fields, script_env

# The settings the benchmark reports before it times anything.
SETTINGS = ("device", "compile", "data", "late_phase", "block_applications", "peak_tflops")

# Every measured or counted figure, each of which must be finite and positive.
POSITIVE_FIGURES = (
    "train_tokens_per_step",
    "train_ms_per_step",
    "train_tokens_per_s",
    "train_flops_per_token",
    "train_tflops_per_s",
    "train_mfu",
    "train_peak_memory_mib",
    "eval_tokens_per_pass",
    "eval_ms_per_pass",
    "eval_tokens_per_s",
    "eval_flops_per_token",
    "eval_tflops_per_s",
    "eval_mfu",
    "eval_peak_memory_mib",
    "reference_ms_per_step",
    "paired_ms_per_step",
    "step_time_ratio_to_reference",
)

# The plain reference's logits can match the script's exactly, so this figure may be 0.
NON_NEGATIVE_FIGURES = ("reference_max_logit_difference",)


def test_benchmark_prints_every_figure(tiny_data):
    env = script_env(tiny_data, BENCH_STEPS="2", BENCH_WARMUP_STEPS="1", BENCH_EVAL_PASSES="1", TRAIN_BATCH_TOKENS="1024")
    command = [sys.executable, str(REPO / "tests" / "bench_train_step.py")]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    fields = {}
    for line in result.stdout.splitlines():
        fields.update(parse_fields(line))

    # The flash-attention probe runs only on CUDA.
    flash = ("flash_attention",) if fields.get("device") == "cuda" else ()
    assert sorted(fields) == sorted(SETTINGS + flash + POSITIVE_FIGURES + NON_NEGATIVE_FIGURES)
    assert fields["data"] == "shards"
    assert fields["late_phase"] == "0"
    assert float(fields["peak_tflops"]) == 989.0
    for name in POSITIVE_FIGURES:
        assert math.isfinite(float(fields[name])), name
        assert float(fields[name]) > 0, name
    for name in NON_NEGATIVE_FIGURES:
        assert math.isfinite(float(fields[name])), name
        assert float(fields[name]) >= 0, name

    # TINY_ENV runs 5 block applications at width 64, each with 28,672 matmul weights (q and proj 64x64,
    # k and v 64x32, MLP 64x128 and 128x64), then a 1024-row head. Attention adds 4·64·64 per application.
    forward_flops = 2 * (5 * 28_672 + 65_536) + 5 * 4 * 64 * 64
    assert int(fields["block_applications"]) == 5
    assert int(fields["train_flops_per_token"]) == 3 * forward_flops
    assert int(fields["eval_flops_per_token"]) == forward_flops
    assert int(fields["train_tokens_per_step"]) == 1024
    assert int(fields["eval_tokens_per_pass"]) == 4096
    assert float(fields["reference_max_logit_difference"]) < 1e-4
