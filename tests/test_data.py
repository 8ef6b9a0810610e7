"""Shard reading, validation split, byte accounting and the training loader."""

from __future__ import annotations

import numpy as np
import pytest
import sentencepiece as spm
import torch

from conftest import SAMPLE, TOKENIZER, sample_tokens, write_shard
from train_mdlm import (
    InputError,
    TrainLoader,
    build_byte_tables,
    check_token_range,
    count_token_bytes,
    find_shards,
    load_validation_tokens,
    read_shard,
)


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(TOKENIZER))


def test_read_shard_accepts_sample():
    path = SAMPLE / "fineweb_val_000000.bin"
    header = np.fromfile(path, dtype="<i4", count=3)
    tokens = read_shard(str(path))
    assert list(header) == [20240520, 1, 65536]
    assert len(tokens) == 65536
    assert np.array_equal(np.asarray(tokens), sample_tokens("fineweb_val_000000.bin"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(magic=20240521), "magic 20240521"),
        (dict(version=2), "version 2"),
        (dict(count=11), "promises 11 tokens"),
        (dict(count=9), "promises 9 tokens"),
    ],
)
def test_read_shard_rejects_bad_header(tmp_path, kwargs, message):
    path = write_shard(tmp_path / "fineweb_train_000000.bin", range(10), **kwargs)
    with pytest.raises(InputError, match=message) as error:
        read_shard(str(path))
    assert str(path) in str(error.value)


def test_read_shard_rejects_truncated_header(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    path.write_bytes(np.array([20240520, 1, 0], dtype="<i4").tobytes())
    with pytest.raises(InputError, match="shorter than its 1024-byte header"):
        read_shard(str(path))


def test_read_shard_rejects_trailing_bytes(tmp_path):
    path = write_shard(tmp_path / "fineweb_val_000000.bin", range(10))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(InputError, match="1045 bytes but its header promises 10 tokens"):
        read_shard(str(path))


def test_find_shards_names_pattern_when_empty(tmp_path):
    pattern = str(tmp_path / "fineweb_train_*.bin")
    with pytest.raises(InputError, match="no training shards found") as error:
        find_shards(pattern, "training")
    assert pattern in str(error.value)


def test_token_range_rejects_ids_past_vocab():
    tokens = np.array([1, 5, 1024, 7], dtype=np.uint16)
    with pytest.raises(InputError, match="token id 1024, outside VOCAB_SIZE=1024"):
        check_token_range(tokens, 1024, "shard.bin")
    check_token_range(tokens, 1025, "shard.bin")


def test_validation_split_drops_short_tail(tmp_path):
    path = write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(1000))
    seqs = load_validation_tokens([str(path)], 256)
    assert seqs.shape == (3, 256)
    assert torch.equal(seqs.flatten(), torch.arange(768))


def test_validation_split_shorter_than_sequence(tmp_path):
    path = write_shard(tmp_path / "fineweb_val_000000.bin", range(100))
    with pytest.raises(InputError, match="100 tokens, fewer than one sequence of TRAIN_SEQ_LEN=256"):
        load_validation_tokens([str(path)], 256)


def split_documents(tokens: np.ndarray, bos: int) -> list[np.ndarray]:
    starts = np.flatnonzero(tokens == bos)
    return [tokens[a:b] for a, b in zip(starts, [*starts[1:], len(tokens)])]


@pytest.mark.parametrize("shard", ["fineweb_val_000000.bin", "fineweb_train_000000.bin"])
def test_byte_count_equals_decoded_utf8_length(sp, shard):
    tables = build_byte_tables(sp)
    documents = split_documents(sample_tokens(shard), sp.bos_id())
    assert len(documents) >= 50
    for document in documents[1:-1]:  # whole documents only: the first and last may be cut
        decoded = sp.decode(document.tolist()).encode("utf-8")
        assert count_token_bytes(document, tables).sum() == len(decoded)


def test_byte_count_of_stream_is_sum_over_documents(sp):
    tables = build_byte_tables(sp)
    tokens = sample_tokens("fineweb_val_000000.bin")
    per_document = sum(int(count_token_bytes(d, tables).sum()) for d in split_documents(tokens, sp.bos_id()))
    assert count_token_bytes(tokens, tables).sum() == per_document


def test_leading_space_counts_after_text_only(sp):
    tables = build_byte_tables(sp)
    word = sp.piece_to_id("\u2581the")
    assert word != sp.unk_id()
    counts = count_token_bytes(np.array([sp.bos_id(), word, word]), tables)
    assert counts.tolist() == [0, 3, 4]  # BOS is free; " the" after BOS has no space byte
    assert count_token_bytes(np.array([word]), tables).tolist() == [3]  # stream start acts as a boundary


def test_byte_tokens_count_one_byte(sp):
    tables = build_byte_tables(sp)
    byte_ids = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    assert len(byte_ids) == 256
    assert count_token_bytes(np.array(byte_ids), tables).tolist() == [1] * 256


def test_train_loader_gives_each_rank_its_slice(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(100))
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(100, 150))
    files = sorted(str(p) for p in tmp_path.glob("fineweb_train_*.bin"))
    cpu = torch.device("cpu")
    single = TrainLoader(files, 0, 1, seqs_per_rank=4, seq_len=10, device=cpu)
    ranks = [TrainLoader(files, r, 2, seqs_per_rank=2, seq_len=10, device=cpu) for r in range(2)]
    for _ in range(5):  # 40 tokens a step over 150 tokens: wraps around past both shards
        whole = single.next_batch()
        assert torch.equal(torch.cat([loader.next_batch() for loader in ranks]), whole)
    expected = (np.arange(160, 200) % 150).reshape(4, 10)
    assert np.array_equal(whole.numpy(), expected)
