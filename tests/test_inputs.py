"""Bad input stops the script with one clear error before any training step."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import expect_input_error, make_dataset, run_script, sample_tokens, script_env, write_shard


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "data", train_tokens=8192, val_tokens=1024)


def test_cli_error_is_one_line(tmp_path, data):
    result = run_script(script_env(data, ITERATIONS="many"), tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: ITERATIONS='many' is not an integer"]
    assert "step:" not in result.stdout


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(ITERATIONS="abc"), "ITERATIONS='abc' is not an integer"),
        (dict(MATRIX_LR="fast"), "MATRIX_LR='fast' is not a number"),
        (dict(MAX_WALLCLOCK_SECONDS="nan"), "MAX_WALLCLOCK_SECONDS='nan' is not a finite number"),
        (dict(NOISE_EPS="2"), "NOISE_EPS=2 is out of range: it must be at most 0.5"),
        (dict(TRAIN_SEQ_LEN="0"), "TRAIN_SEQ_LEN=0 is out of range: it must be at least 2"),
        (dict(EXPORT_COMPRESSOR="lzma"), "EXPORT_COMPRESSOR='lzma' is invalid: choose one of zlib, zstd"),
        (dict(NUM_HEADS="3"), "MODEL_DIM=64 must be divisible by NUM_HEADS=3"),
        (dict(NUM_KV_HEADS="3"), "NUM_HEADS=4 must be divisible by NUM_KV_HEADS=3"),
        (dict(LOOP_END="3"), "LOOP_END=3 must satisfy 0 <= LOOP_START <= LOOP_END <= 2"),
        (dict(UNET_SKIPS="5"), "UNET_SKIPS=5 is out of range: NUM_LAYERS=4 allows at most 2"),
        (dict(RUN_ID="a/b"), "RUN_ID='a/b' is invalid"),
        (dict(TRAIN_BATCH_TOKENS="1000"), "TRAIN_BATCH_TOKENS=1000 must be a positive multiple of TRAIN_SEQ_LEN*WORLD_SIZE=64*1"),
        (dict(TRAIN_BATCH_TOKENS="2112", WORLD_SIZE="2"), "TRAIN_BATCH_TOKENS=2112 must be a positive multiple of TRAIN_SEQ_LEN*WORLD_SIZE=64*2"),
        (dict(MICRO_BATCH_TOKENS="320"), "do not split into micro-batches of MICRO_BATCH_TOKENS=320"),
        (dict(VOCAB_SIZE="512"), "has 1024 pieces but VOCAB_SIZE=512"),
    ],
)
def test_invalid_setting(monkeypatch, tmp_path, data, overrides, message):
    expect_input_error(monkeypatch, tmp_path, script_env(data, **overrides), message)


def test_missing_training_shards(monkeypatch, tmp_path, data):
    for shard in data.glob("fineweb_train_*.bin"):
        shard.unlink()
    text = expect_input_error(monkeypatch, tmp_path, script_env(data), "no training shards found")
    assert str(data / "fineweb_train_*.bin") in text


def test_missing_validation_shards(monkeypatch, tmp_path, data):
    (data / "fineweb_val_000000.bin").unlink()
    expect_input_error(monkeypatch, tmp_path, script_env(data), "no validation shards found")


def test_missing_tokenizer(monkeypatch, tmp_path, data):
    env = script_env(data, TOKENIZER_PATH=str(tmp_path / "nope.model"))
    expect_input_error(monkeypatch, tmp_path, env, f"tokenizer not found: TOKENIZER_PATH={tmp_path / 'nope.model'}")


def test_tokenizer_file_not_sentencepiece(monkeypatch, tmp_path, data):
    bogus = tmp_path / "bogus.model"
    bogus.write_bytes(b"not a model")
    expect_input_error(monkeypatch, tmp_path, script_env(data, TOKENIZER_PATH=str(bogus)), "is not a SentencePiece model")


def test_corrupt_training_header(monkeypatch, tmp_path, data):
    shard = data / "fineweb_train_000001.bin"
    write_shard(shard, range(100), magic=12345)
    text = expect_input_error(monkeypatch, tmp_path, script_env(data), "has magic 12345, expected 20240520")
    assert str(shard) in text


def test_truncated_validation_shard(monkeypatch, tmp_path, data):
    shard = data / "fineweb_val_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    text = expect_input_error(monkeypatch, tmp_path, script_env(data), "but its header promises 1024 tokens")
    assert str(shard) in text


def test_token_outside_vocab(monkeypatch, tmp_path, data):
    shard = data / "fineweb_train_000000.bin"
    write_shard(shard, [1, 5, 2000, 6])
    text = expect_input_error(monkeypatch, tmp_path, script_env(data), "contains token id 2000, outside VOCAB_SIZE=1024")
    assert str(shard) in text


def test_validation_shorter_than_one_sequence(monkeypatch, tmp_path, data):
    write_shard(data / "fineweb_val_000000.bin", sample_tokens("fineweb_val_000000.bin")[:50])
    expect_input_error(monkeypatch, tmp_path, script_env(data), "has 50 tokens, fewer than one sequence of TRAIN_SEQ_LEN=64")


def test_shards_from_another_tokenizer(monkeypatch, tmp_path, data):
    shifted = (sample_tokens("fineweb_val_000000.bin")[:1024].astype(np.int64) + 7) % 1024
    write_shard(data / "fineweb_val_000000.bin", shifted)
    expect_input_error(monkeypatch, tmp_path, script_env(data), "starts with token 8, not the BOS id 1")


def test_zstd_requested_without_package(monkeypatch, tmp_path, data):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import now raises ImportError
    expect_input_error(monkeypatch, tmp_path, script_env(data, EXPORT_COMPRESSOR="zstd"), "pip install zstandard")

