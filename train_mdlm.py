"""
Masked-diffusion language model (MDLM) for the Parameter Golf challenge.

A bidirectional transformer trained with absorbing-state ([MASK]) diffusion under a linear schedule,
with depth recurrence, Muon, EMA, late int8 QAT and an int8+zlib export that is read back from disk and
scored on the whole validation split. Every setting is an environment variable (see Hyperparameters).

    torchrun --standalone --nproc_per_node=8 train_mdlm.py     # GPUs: NCCL, bf16, torch.compile
    python train_mdlm.py                                       # one process, CUDA if present, else CPU
"""

from __future__ import annotations

import copy
import gc
import glob
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

# -----------------------------
# HYPERPARAMETERS
# -----------------------------
# Defaults reproduce the reference 8xH100 run: 9 blocks at width 512 (12 block applications with the
# loop), 524,288 tokens per step at length 1024, 600 s of training. The final score is the elbo
# estimator (an upper bound in expectation) rather than the reference run's trap8.


class InputError(Exception):
    """Invalid input (env var, shard, tokenizer); main prints it as one line and exits with status 2."""


def env_value(env, name: str, default, parse, kind: str, low=None, high=None):
    raw = env.get(name, "")
    if raw.strip() == "":
        return default
    try:
        value = parse(raw.strip())
    except ValueError:
        raise InputError(f"{name}={raw!r} is not {kind}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{name}={raw!r} is not a finite number")
    if low is not None and value < low:
        raise InputError(f"{name}={raw.strip()} is out of range: it must be at least {low}")
    if high is not None and value > high:
        raise InputError(f"{name}={raw.strip()} is out of range: it must be at most {high}")
    return value


def env_int(env, name: str, default: int, low=None, high=None) -> int:
    return env_value(env, name, default, int, "an integer", low, high)


def env_float(env, name: str, default: float, low=None, high=None) -> float:
    return env_value(env, name, default, float, "a number", low, high)


def env_choice(env, name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(name, "").strip() or default
    if value not in choices:
        raise InputError(f"{name}={value!r} is invalid: choose one of {', '.join(choices)}")
    return value


class Hyperparameters:
    """Every setting of a run, read from environment variables (names follow the challenge's train_gpt.py)."""

    def __init__(self, env=os.environ):
        # Data: shard folder with fineweb_train_*.bin and fineweb_val_*.bin, and the SentencePiece model.
        self.data_path = env.get("DATA_PATH", "./data/datasets/fineweb10B_sp1024")
        self.train_files = os.path.join(self.data_path, "fineweb_train_*.bin")
        self.val_files = os.path.join(self.data_path, "fineweb_val_*.bin")
        self.tokenizer_path = env.get("TOKENIZER_PATH", "./data/tokenizers/fineweb_1024_bpe.model")
        self.run_id = env.get("RUN_ID", "").strip() or str(uuid.uuid4())
        if "/" in self.run_id or "\\" in self.run_id:
            raise InputError(f"RUN_ID={self.run_id!r} is invalid: it names a log file and cannot contain a slash")
        self.seed = env_int(env, "SEED", 1337)

        # Length: stop at ITERATIONS steps or MAX_WALLCLOCK_SECONDS of training (0 = no time cap).
        self.iterations = env_int(env, "ITERATIONS", 20000, low=0)
        self.max_wallclock_seconds = env_float(env, "MAX_WALLCLOCK_SECONDS", 600.0, low=0.0)
        self.warmup_steps = env_int(env, "WARMUP_STEPS", 20, low=0)  # compile warmup, rolled back
        self.warmdown_iters = env_int(env, "WARMDOWN_ITERS", 1200, low=0)  # linear LR decay to 0
        self.train_seq_len = env_int(env, "TRAIN_SEQ_LEN", 1024, low=2)
        self.train_batch_tokens = env_int(env, "TRAIN_BATCH_TOKENS", 524_288, low=2)  # global, per step
        # Tokens one rank runs through the model at once; larger shares use gradient accumulation.
        self.micro_batch_tokens = env_int(env, "MICRO_BATCH_TOKENS", 65_536, low=2)
        self.val_loss_every = env_int(env, "VAL_LOSS_EVERY", 1000, low=0)  # 0 = only the final score
        self.train_log_every = env_int(env, "TRAIN_LOG_EVERY", 200, low=0)

        # Model shape.
        self.vocab_size = env_int(env, "VOCAB_SIZE", 1024, low=2, high=65535)  # [MASK] gets id VOCAB_SIZE
        self.num_layers = env_int(env, "NUM_LAYERS", 9, low=2)
        self.model_dim = env_int(env, "MODEL_DIM", 512, low=2)
        self.num_heads = env_int(env, "NUM_HEADS", 8, low=1)
        self.num_kv_heads = env_int(env, "NUM_KV_HEADS", 4, low=1)
        self.mlp_mult = env_int(env, "MLP_MULT", 2, low=1)
        self.rope_base = env_float(env, "ROPE_BASE", 10000.0, low=1.0)
        self.qk_gain_init = env_float(env, "QK_GAIN_INIT", 1.5)
        self.logit_softcap = env_float(env, "LOGIT_SOFTCAP", 30.0, low=1e-3)
        self.tied_embed_init_std = env_float(env, "TIED_EMBED_INIT_STD", 0.005, low=0.0)
        self.unet_skips = env_int(env, "UNET_SKIPS", 3, low=0)  # encoder-to-decoder skip connections
        # Depth recurrence: blocks LOOP_START..LOOP_END-1 run LOOP_EXTRA more times after the encoder half.
        self.loop_start = env_int(env, "LOOP_START", 1, low=0)
        self.loop_end = env_int(env, "LOOP_END", 4, low=0)
        self.loop_extra = env_int(env, "LOOP_EXTRA", 1, low=0)

        # Diffusion: per-sequence mask rate t drawn from [NOISE_EPS, 1] in antithetic pairs.
        self.noise_eps = env_float(env, "NOISE_EPS", 0.05, low=1e-4, high=0.5)

        # Evaluation: methods over the whole validation split; the first sets the final val_bpb.
        self.eval_methods = env.get("EVAL_METHOD", "").strip() or "elbo"  # comma list: elbo, chainK, trap8
        self.eval_passes = env_int(env, "EVAL_PASSES", 32, low=2)  # elbo forward passes per sequence
        self.eval_batch_tokens = env_int(env, "EVAL_BATCH_TOKENS", 65_536, low=1)  # per rank per forward pass
        self.eval_seed = env_int(env, "EVAL_SEED", 0, low=0)  # masks of the random estimators
        self.eval_only = env.get("EVAL_ONLY", "").strip()  # artifact to score instead of training

        # Optimizer: Muon for block matrices, Adam for the embedding and for scalars and control tensors.
        self.matrix_lr = env_float(env, "MATRIX_LR", 0.04, low=0.0)
        self.embed_lr = env_float(env, "EMBED_LR", 0.05, low=0.0)
        self.scalar_lr = env_float(env, "SCALAR_LR", 0.04, low=0.0)
        self.muon_momentum = env_float(env, "MUON_MOMENTUM", 0.95, low=0.0, high=0.9999)
        self.muon_momentum_warmup_start = env_float(env, "MUON_MOMENTUM_WARMUP_START", 0.85, low=0.0, high=0.9999)
        self.muon_momentum_warmup_steps = env_int(env, "MUON_MOMENTUM_WARMUP_STEPS", 500, low=0)
        self.muon_backend_steps = env_int(env, "MUON_BACKEND_STEPS", 5, low=1)  # Newton-Schulz iterations
        self.muon_weight_decay = env_float(env, "MUON_WEIGHT_DECAY", 0.01, low=0.0)
        self.beta1 = env_float(env, "BETA1", 0.9, low=0.0, high=0.9999)
        self.beta2 = env_float(env, "BETA2", 0.95, low=0.0, high=0.99999)
        self.adam_eps = env_float(env, "ADAM_EPS", 1e-8, low=1e-12)
        self.grad_clip_norm = env_float(env, "GRAD_CLIP_NORM", 0.0, low=0.0)  # 0 = no clipping

        # Late-training tricks, both keyed to the LR multiplier of the warmdown.
        self.ema_decay = env_float(env, "EMA_DECAY", 0.997, low=0.0, high=0.999999)
        self.ema_start_lr_scale = env_float(env, "EMA_START_LR_SCALE", 0.4, low=0.0, high=1.0)
        self.qat_start_lr_scale = env_float(env, "QAT_START_LR_SCALE", 0.4, low=0.0, high=1.0)

        # Export and runtime.
        self.export_compressor = env_choice(env, "EXPORT_COMPRESSOR", "zlib", ("zlib", "zstd"))
        self.torch_compile = env_choice(env, "TORCH_COMPILE", "auto", ("auto", "0", "1"))
        self.device = env_choice(env, "DEVICE", "auto", ("auto", "cuda", "cpu"))
        # After the final score: text samples from the roundtrip model, then the record folder (records/record_writer.py).
        self.sample_count = env_int(env, "SAMPLE_COUNT", 0, low=0)  # unconditional samples, as many again after SAMPLE_PROMPT
        self.sample_len = env_int(env, "SAMPLE_LEN", self.train_seq_len, low=1, high=self.train_seq_len)  # prompt included; RoPE table size
        self.sample_steps = env_int(env, "SAMPLE_STEPS", 256, low=1)  # sampler steps from t=1 to t=0
        self.sample_prompt = env.get("SAMPLE_PROMPT", "")  # text kept fixed after a BOS token
        self.sample_seed = env_int(env, "SAMPLE_SEED", 0, low=0)
        self.record_dir = env.get("RECORD_DIR", "").strip()  # empty = no record; the RECORD_* texts fill submission.json
        self.record_author = env.get("RECORD_AUTHOR", "").strip()
        self.record_github_id = env.get("RECORD_GITHUB_ID", "").strip()
        self.record_name = env.get("RECORD_NAME", "").strip() or Path(self.record_dir).name
        self.record_blurb = env.get("RECORD_BLURB", "").strip()
        if self.record_dir and self.eval_only:
            raise InputError(f"RECORD_DIR={self.record_dir} records a training run: unset it or EVAL_ONLY")
        self.check_shape()
        self.parse_eval_methods()

    @property
    def num_encoder_layers(self) -> int:
        return self.num_layers // 2

    def check_shape(self) -> None:
        if self.model_dim % self.num_heads != 0:
            raise InputError(f"MODEL_DIM={self.model_dim} must be divisible by NUM_HEADS={self.num_heads}")
        if (self.model_dim // self.num_heads) % 2 != 0:
            raise InputError(f"MODEL_DIM/NUM_HEADS={self.model_dim // self.num_heads} must be even for RoPE")
        if self.num_heads % self.num_kv_heads != 0:
            raise InputError(f"NUM_HEADS={self.num_heads} must be divisible by NUM_KV_HEADS={self.num_kv_heads}")
        max_skips = min(self.num_encoder_layers, self.num_layers - self.num_encoder_layers)
        if self.unet_skips > max_skips:
            raise InputError(f"UNET_SKIPS={self.unet_skips} is out of range: NUM_LAYERS={self.num_layers} allows at most {max_skips}")
        if not self.loop_start <= self.loop_end <= self.num_encoder_layers:
            bound = f"0 <= LOOP_START <= LOOP_END <= {self.num_encoder_layers} (the encoder half of NUM_LAYERS)"
            raise InputError(f"LOOP_START={self.loop_start} and LOOP_END={self.loop_end} must satisfy {bound}")

    def parse_eval_methods(self) -> list[EvalMethod]:
        if self.eval_passes % 2 or self.eval_passes // 2 > self.train_seq_len:
            reason = "elbo splits its passes into two independent halves of strata over 1..TRAIN_SEQ_LEN"
            raise InputError(f"EVAL_PASSES={self.eval_passes} must be even and at most 2*TRAIN_SEQ_LEN={2 * self.train_seq_len}: {reason}")
        return parse_eval_methods(self.eval_methods, self.train_seq_len, self.eval_passes)

    def check_batch(self, world_size: int) -> tuple[int, int]:
        """Return (sequences per rank per step, gradient accumulation steps), or raise InputError."""
        seqs, rest = divmod(self.train_batch_tokens, self.train_seq_len * world_size)
        if rest or seqs == 0:
            message = f"must be a positive multiple of TRAIN_SEQ_LEN*WORLD_SIZE={self.train_seq_len}*{world_size}"
            raise InputError(f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} {message}")
        micro_seqs = max(self.micro_batch_tokens // self.train_seq_len, 1)
        accum_steps = max(seqs // micro_seqs, 1)
        if seqs % accum_steps:
            advice = f"Pick a MICRO_BATCH_TOKENS that divides {seqs * self.train_seq_len}."
            raise InputError(f"each rank's {seqs} sequences per step do not split into micro-batches of MICRO_BATCH_TOKENS={self.micro_batch_tokens} tokens. {advice}")
        return seqs, accum_steps


# -----------------------------
# DATA AND BYTE ACCOUNTING
# -----------------------------
# Shard format (the challenge's): 256 little-endian int32 (magic, version, token count, zeros), then
# the tokens as little-endian uint16.

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_BYTES = 256 * 4


def read_shard(path: str) -> np.ndarray:
    """Map a shard's tokens after checking its header and file size."""
    if not os.path.isfile(path):
        raise InputError(f"shard not found: {path}")
    size = os.path.getsize(path)
    if size < SHARD_HEADER_BYTES:
        raise InputError(f"shard {path} is {size} bytes, shorter than its {SHARD_HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=256)
    if int(header[0]) != SHARD_MAGIC:
        raise InputError(f"shard {path} has magic {int(header[0])}, expected {SHARD_MAGIC}: not a challenge shard, or corrupt")
    if int(header[1]) != SHARD_VERSION:
        raise InputError(f"shard {path} has version {int(header[1])}, expected {SHARD_VERSION}")
    count = int(header[2])
    expected = SHARD_HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        fix = "the file is truncated or corrupt, download it again"
        raise InputError(f"shard {path} is {size} bytes but its header promises {count} tokens ({expected} bytes): {fix}")
    if count == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(count,))


def check_token_range(tokens: np.ndarray, vocab_size: int, path: str) -> None:
    chunk = 1 << 24
    for start in range(0, len(tokens), chunk):
        top = int(tokens[start : start + chunk].max())
        if top >= vocab_size:
            fix = "set VOCAB_SIZE and TOKENIZER_PATH to the tokenizer the shards were made with"
            raise InputError(f"shard {path} contains token id {top}, outside VOCAB_SIZE={vocab_size}: {fix}")


def find_shards(pattern: str, split: str) -> list[str]:
    files = sorted(glob.glob(pattern))
    if not files:
        raise InputError(f"no {split} shards found: nothing matches {pattern} (set DATA_PATH)")
    return files


def check_shards(files: list[str], vocab_size: int) -> int:
    """Validate every shard's header, size and token ids; return the total token count."""
    total = 0
    for path in files:
        tokens = read_shard(path)
        check_token_range(tokens, vocab_size, path)
        total += len(tokens)
    return total


def load_validation_tokens(files: list[str], seq_len: int) -> Tensor:
    """Return the validation split cut into (num_seqs, seq_len) sequences; a shorter tail is dropped."""
    tokens = np.concatenate([np.asarray(read_shard(path)) for path in files])
    num_seqs = len(tokens) // seq_len
    if num_seqs == 0:
        split = f"the validation split ({', '.join(files)})"
        raise InputError(f"{split} has {len(tokens)} tokens, fewer than one sequence of TRAIN_SEQ_LEN={seq_len}")
    return torch.from_numpy(tokens[: num_seqs * seq_len].astype(np.int64)).view(num_seqs, seq_len)


def load_tokenizer(path: str, vocab_size: int) -> spm.SentencePieceProcessor:
    if not os.path.isfile(path):
        raise InputError(f"tokenizer not found: TOKENIZER_PATH={path}")
    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as error:
        raise InputError(f"TOKENIZER_PATH={path} is not a SentencePiece model: {error}") from None
    if sp.vocab_size() != vocab_size:
        raise InputError(f"tokenizer {path} has {sp.vocab_size()} pieces but VOCAB_SIZE={vocab_size}")
    return sp


@dataclass
class ByteTables:
    """Per-token-id tables for the challenge's UTF-8 byte count of a token stream."""

    base_bytes: np.ndarray  # bytes of the piece without its leading "▁"; byte tokens 1; control 0
    has_leading_space: np.ndarray  # the piece starts with "▁", one byte unless after a boundary token
    is_boundary: np.ndarray  # control, unknown and unused tokens


def build_byte_tables(sp: spm.SentencePieceProcessor) -> ByteTables:
    size = sp.vocab_size()
    tables = ByteTables(np.zeros(size, np.int64), np.zeros(size, bool), np.ones(size, bool))
    for token in range(size):
        if sp.is_control(token) or sp.is_unknown(token) or sp.is_unused(token):
            continue
        tables.is_boundary[token] = False
        if sp.is_byte(token):
            tables.base_bytes[token] = 1
            continue
        piece = sp.id_to_piece(token)
        if piece.startswith("\u2581"):
            tables.has_leading_space[token] = True
            piece = piece[1:]
        tables.base_bytes[token] = len(piece.encode("utf-8"))
    return tables


def count_token_bytes(tokens: np.ndarray, tables: ByteTables) -> np.ndarray:
    """Bytes of each token of one stream; the first token is read as following a boundary token."""
    tokens = np.asarray(tokens, dtype=np.int64)
    counts = tables.base_bytes[tokens].copy()
    after_text = np.zeros(len(tokens), bool)
    after_text[1:] = ~tables.is_boundary[tokens[:-1]]
    counts += tables.has_leading_space[tokens] & after_text
    return counts


class TokenStream:
    """The training shards read in order as one endless stream, wrapping around at the end."""

    def __init__(self, files: list[str]):
        self.files = files
        self.file_index = -1
        self.tokens = np.zeros(0, np.uint16)
        self.pos = 0

    def take(self, count: int) -> np.ndarray:
        parts = []
        while count > 0:
            if self.pos == len(self.tokens):
                self.file_index = (self.file_index + 1) % len(self.files)
                self.tokens, self.pos = read_shard(self.files[self.file_index]), 0
                continue
            part = self.tokens[self.pos : self.pos + count]
            parts.append(part)
            self.pos += len(part)
            count -= len(part)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)  # one part: a view, no copy


class TrainLoader:
    """Cuts each global batch (TRAIN_BATCH_TOKENS consecutive tokens) into equal rank slices."""

    def __init__(self, files: list[str], rank: int, world_size: int, seqs_per_rank: int, seq_len: int, device):
        self.stream = TokenStream(files)
        self.rank, self.world_size = rank, world_size
        self.seqs_per_rank, self.seq_len = seqs_per_rank, seq_len
        self.device = device

    def next_batch(self) -> Tensor:
        rank_tokens = self.seqs_per_rank * self.seq_len
        batch = self.stream.take(rank_tokens * self.world_size)
        local = torch.from_numpy(batch[self.rank * rank_tokens : (self.rank + 1) * rank_tokens].astype(np.int64))
        if self.device.type == "cuda":
            local = local.pin_memory()
        return local.view(self.seqs_per_rank, self.seq_len).to(self.device, non_blocking=True)


# -----------------------------
# MODEL
# -----------------------------
# Control tensors are small per-channel gains and mixes; they stay in float32 in the artifact.
CONTROL_TENSOR_NAMES = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weights")
INT8_MAX = 127
INT8_MIN_SCALE = 2.0**-14  # smallest normal float16, so a stored row scale never underflows


def quantize_per_row(w: Tensor, clip_abs: Tensor) -> tuple[Tensor, Tensor]:
    """Round each row of w to int8 steps of clip_abs/127 (float16 scale); values past the clip saturate."""
    scale = (clip_abs.float() / INT8_MAX).clamp_min(INT8_MIN_SCALE).to(torch.float16)
    q = torch.clamp(torch.round(w.float() / scale.float()[:, None]), -INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def dequantize_per_row(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float()[:, None]


def fake_quantize_per_row(w: Tensor) -> Tensor:
    """Round w to the export's int8 grid (row-max clip) in the forward pass, passing the gradient straight through (QAT)."""
    detached = w.detach()
    q, scale = quantize_per_row(detached, detached.abs().amax(dim=1))
    return w + (dequantize_per_row(q, scale).to(w.dtype) - detached)


class CastedLinear(nn.Linear):
    """Linear layer with float32 weights cast to the activation dtype; int8 fake-quantized while qat is set."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init = zero_init
        self.qat = False

    def forward(self, x: Tensor) -> Tensor:
        weight = fake_quantize_per_row(self.weight) if self.qat else self.weight
        return F.linear(x, weight.to(x.dtype))


class Rotary(nn.Module):
    """RoPE cos/sin tables, built once for the longest sequence and sliced per call."""

    def __init__(self, head_dim: int, max_len: int, base: float):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", angles.sin()[None, :, None, :], persistent=False)

    def forward(self, seq_len: int) -> tuple[Tensor, Tensor]:
        return self.cos[:, :seq_len], self.sin[:, :seq_len]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class SelfAttention(nn.Module):
    """Bidirectional grouped-query attention with RMS-normalized q and k and a learned per-head gain."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, qk_gain_init: float):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, num_kv_heads * self.head_dim)
        self.c_v = CastedLinear(dim, num_kv_heads * self.head_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        batch, seq_len, dim = x.shape
        q = self.c_q(x).view(batch, seq_len, self.num_heads, self.head_dim)
        k = self.c_k(x).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        v = self.c_v(x).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        q = apply_rotary(F.rms_norm(q, (self.head_dim,)), cos, sin) * self.q_gain.to(q.dtype)[:, None]
        k = apply_rotary(F.rms_norm(k, (self.head_dim,)), cos, sin)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=False, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.proj(y.transpose(1, 2).reshape(batch, seq_len, dim))


class MLP(nn.Module):
    """relu² MLP (modded-nanogpt)."""

    def __init__(self, dim: int, mlp_mult: int):
        super().__init__()
        self.fc = CastedLinear(dim, mlp_mult * dim)
        self.proj = CastedLinear(mlp_mult * dim, dim, zero_init=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.relu(self.fc(x)).square())


class Block(nn.Module):
    """Pre-norm transformer block whose input is a learned per-channel mix of the stream and the embedding x0."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, mlp_mult: int, qk_gain_init: float):
        super().__init__()
        self.attn = SelfAttention(dim, num_heads, num_kv_heads, qk_gain_init)
        self.mlp = MLP(dim, mlp_mult)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))

    def forward(self, x: Tensor, x0: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = self.resid_mix[0] * x + self.resid_mix[1] * x0
        x = x + self.attn_scale * self.attn(F.rms_norm(x, (x.size(-1),)), cos, sin)
        return x + self.mlp_scale * self.mlp(F.rms_norm(x, (x.size(-1),)))


class DiffusionTransformer(nn.Module):
    """Denoiser x_θ(x_t): logits over the real vocabulary at every position, with no time input.

    The number of [MASK] tokens in x_t carries the noise level, so the model needs no t.
    Block order: encoder half, the loop blocks LOOP_EXTRA more times, decoder half with U-Net skips.
    """

    def __init__(self, args: Hyperparameters):
        super().__init__()
        dim = args.model_dim
        self.vocab_size = args.vocab_size
        self.mask_id = args.vocab_size
        self.logit_softcap = args.logit_softcap
        self.num_encoder_layers = args.num_encoder_layers
        self.loop_blocks = list(range(args.loop_start, args.loop_end)) * args.loop_extra
        self.tok_emb = nn.Embedding(args.vocab_size + 1, dim)
        self.blocks = nn.ModuleList(Block(dim, args.num_heads, args.num_kv_heads, args.mlp_mult, args.qk_gain_init) for _ in range(args.num_layers))
        self.skip_weights = nn.Parameter(torch.ones(args.unet_skips, dim))
        self.rotary = Rotary(dim // args.num_heads, args.train_seq_len, args.rope_base)
        # Settings that change the function but no tensor shape; the artifact keeps them for rescoring.
        names = ("TRAIN_SEQ_LEN", "LOOP_START", "LOOP_END", "LOOP_EXTRA", "ROPE_BASE", "LOGIT_SOFTCAP")
        self.settings = {name: getattr(args, name.lower()) for name in names}
        self.qat = False
        self.init_weights(args.tied_embed_init_std)

    def init_weights(self, embed_std: float) -> None:
        nn.init.normal_(self.tok_emb.weight, std=embed_std)
        for module in self.modules():
            if isinstance(module, CastedLinear):
                if module.zero_init:
                    nn.init.zeros_(module.weight)
                else:
                    nn.init.orthogonal_(module.weight)

    def block_schedule(self) -> list[int]:
        """Physical block index of every block application, in order."""
        encoder = list(range(self.num_encoder_layers))
        decoder = list(range(self.num_encoder_layers, len(self.blocks)))
        return encoder + self.loop_blocks + decoder

    def set_qat(self, enabled: bool) -> None:
        self.qat = enabled
        for module in self.modules():
            if isinstance(module, CastedLinear):
                module.qat = enabled

    def forward(self, x_t: Tensor, positions: Tensor | None = None) -> Tensor:
        """Return logits at every position, shape (B, L, V), or only at the flat indices `positions`, shape (K, V)."""
        emb_weight = fake_quantize_per_row(self.tok_emb.weight) if self.qat else self.tok_emb.weight
        x = F.rms_norm(F.embedding(x_t, emb_weight), (emb_weight.size(1),))
        x0 = x
        cos, sin = self.rotary(x_t.size(1))
        skips = []
        for i in range(self.num_encoder_layers):
            x = self.blocks[i](x, x0, cos, sin)
            skips.append(x)
        for i in self.loop_blocks:
            x = self.blocks[i](x, x0, cos, sin)
        for j, i in enumerate(range(self.num_encoder_layers, len(self.blocks))):
            if j < len(self.skip_weights):
                x = x + self.skip_weights[j] * skips.pop()
            x = self.blocks[i](x, x0, cos, sin)
        x = F.rms_norm(x, (x.size(-1),))
        if positions is not None:
            x = x.flatten(0, 1)[positions]
        # SUBS: the head has no [MASK] row, so [MASK] is never predicted.
        logits = F.linear(x, emb_weight[: self.vocab_size].to(x.dtype)).float()
        return self.logit_softcap * torch.tanh(logits / self.logit_softcap)


# -----------------------------
# DIFFUSION OBJECTIVE
# -----------------------------
# Absorbing diffusion with the linear schedule α_t = 1 − t: at time t each token is [MASK] with
# probability t. The continuous-time NELBO is ∫₀¹ (1/t) E[Σ_{masked i} −log p_θ(x₀ⁱ | x_t)] dt, the 1/t
# being −α'_t / (1 − α_t). SUBS: masked positions predict a real token, unmasked ones copy the input,
# so only masked positions carry loss.


def seeded_generator(entropy: list[int], device="cpu") -> torch.Generator:
    """Return a generator seeded by a tuple of integers (a seed and indices), so draws do not depend on ranks or batching."""
    # torch's CPU generator keeps only 32 bits of a seed, so mix the tuple into 32 well-spread bits.
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))


def sample_mask_rates(batch_size: int, eps: float, device, generator=None) -> Tensor:
    """Draw mask rates in antithetic pairs (t, 1 + eps − t) on adjacent rows, t ~ U[eps, 1], for lower-variance batches."""
    t = eps + (1.0 - eps) * torch.rand((batch_size + 1) // 2, device=device, generator=generator)
    return torch.stack((t, 1.0 + eps - t), dim=1).flatten()[:batch_size]


def draw_mask_noise(seed: int, step: int, rows: int, seq_len: int, eps: float, device) -> tuple[Tensor, Tensor]:
    """Draw the mask rates t and uniforms u (x_t is [MASK] where u < t) for every row of a step's global batch.
    Each rank takes its own rows, so the masks do not depend on the number of ranks or micro-batches."""
    generator = seeded_generator([seed, step], device)
    return sample_mask_rates(rows, eps, device, generator), torch.rand(rows, seq_len, device=device, generator=generator)


def mask_tokens(x0: Tensor, t: Tensor, u: Tensor, mask_id: int) -> tuple[Tensor, Tensor]:
    """Sample x_t ~ q(x_t | x_0): with u ~ U[0, 1) per token, each token is [MASK] with probability t (per row)."""
    masked = u < t[:, None]
    return torch.where(masked, mask_id, x0), masked


def loss_positions(masked: Tensor, eps: float) -> Tensor:
    """Select a fixed number of flat positions, every masked one first, so the head and the loss skip most unmasked
    positions at a static shape. Antithetic pairs mask (1 + eps)·L tokens per pair on average (a row without its pair
    at most L), and by Hoeffding's inequality a count 4·sqrt(B·L) above that has probability below e^-32."""
    batch, length = masked.shape
    expected = (batch // 2) * (1 + eps) * length + (batch % 2) * length
    budget = min(batch * length, math.ceil(expected + 4 * math.sqrt(batch * length)))
    # NOTE: masked tokens beyond the budget (probability below 1.3e-14 per micro-batch) drop out of the loss.
    return torch.argsort(masked.flatten().to(torch.uint8), descending=True, stable=True)[:budget]


def diffusion_loss(model: nn.Module, x0: Tensor, t: Tensor, u: Tensor, eps: float, mask_id: int) -> Tensor:
    """One-sample NELBO per token: Σ_masked (1/t)·(−log p_θ) over the batch, divided by all B·L positions."""
    x_t, masked = mask_tokens(x0, t, u, mask_id)
    positions = loss_positions(masked, eps)
    nll = F.cross_entropy(model(x_t, positions), x0.flatten()[positions], reduction="none")
    weight = masked.flatten()[positions] / t[positions // x0.size(1)]  # 0 at the unmasked positions selected
    return (nll * weight).sum() / x0.numel()


class DiffusionObjective(nn.Module):
    """The module form of diffusion_loss, so that torch.compile traces masking, forward and loss as one graph."""

    def __init__(self, model: DiffusionTransformer, eps: float):
        super().__init__()
        self.model, self.eps = model, eps

    def forward(self, x0: Tensor, t: Tensor, u: Tensor) -> Tensor:
        return diffusion_loss(self.model, x0, t, u, self.eps, self.model.mask_id)


# -----------------------------
# LIKELIHOOD EVALUATION
# -----------------------------
# Every method scores the whole validation split as rows: one row is one forward pass over one
# sequence with some positions masked, and its value is a weighted sum of −log p_θ over its scored
# positions. A method fixes the rows of a sequence (passes_per_seq of them) and how they add up:
#   elbo    the continuous-time NELBO in its exact-count form, an upper bound on the code length in
#           expectation: Σ_{m=1..L} (1/m)·E_{|M|=m}[Σ_{i∈M} −log p_θ(x_i | x_{−M})], where the 1/m is
#           ∫₀¹ (1/t)·P(|M| = m | t) dt for α_t = 1 − t. m is drawn stratified over 1..L and exactly m
#           positions are masked, so every weight is bounded (no 1/t blow-up as t → 0).
#   chainK  the exact code length of a left-to-right factorization in blocks of K tokens. Each block is
#           predicted from one pass over the revealed prefix with everything after it masked. Its
#           distribution is a product of normalized per-token distributions, so the sum is a true
#           log-likelihood. K = 1 is the exact left-to-right likelihood.
#   trap8   the reference run's estimator: the NELBO integrand at eight mask rates with trapezoid
#           weights. It covers t in [0.05, 0.95] only (weights sum to 0.9) and is NOT a bound.
# Random draws come from a generator per (EVAL_SEED, sequence, method), rows are processed in
# fixed global chunks dealt round-robin to ranks, and sums are float64 in a fixed order, so a result
# does not depend on the number of ranks.

TRAP8_MASK_RATES = (0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95)
METHOD_KINDS = {"elbo": "nelbo_estimate", "chain": "exact_code_length", "trap8": "not_a_bound"}


def trapezoid_weights(points: tuple[float, ...]) -> list[float]:
    inner = [(points[i + 1] - points[i - 1]) / 2 for i in range(1, len(points) - 1)]
    return [(points[1] - points[0]) / 2, *inner, (points[-1] - points[-2]) / 2]


def elbo_strata(seq_len: int, passes: int) -> list[tuple[int, int]]:
    """Split m = 1..L into passes/2 contiguous strata [lo, hi); each half of the passes covers all of them."""
    count = passes // 2
    edges = [1 + k * seq_len // count for k in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def elbo_rows(x0: Tensor, gen: torch.Generator, passes: int) -> tuple[Tensor, Tensor]:
    """Draw one sequence's elbo rows: two independent stratified halves of passes/2 masks and weights.

    Row k of a half draws m uniformly from stratum [lo, hi), masks m positions uniformly and weighs
    the masked −log p by (hi − lo)/m, an unbiased estimate of Σ_{m in stratum} (1/m)·E[Σ_M −log p].
    Each half sums to an unbiased NELBO estimate; the row weights carry an extra 1/2 to average them.
    """
    seq_len = x0.numel()
    masks, weights = [], []
    for _ in range(2):
        for lo, hi in elbo_strata(seq_len, passes):
            m = int(torch.randint(lo, hi, (1,), generator=gen))
            mask = torch.zeros(seq_len, dtype=torch.bool)
            mask[torch.randperm(seq_len, generator=gen)[:m]] = True
            masks.append(mask)
            weights.append((hi - lo) / m / 2)
    return torch.stack(masks), torch.tensor(weights, dtype=torch.float64)


def trap8_rows(x0: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draw one sequence's trap8 rows: a mask at each rate t_j, weighted w_j/t_j (trapezoid weight w_j)."""
    rates = torch.tensor(TRAP8_MASK_RATES)
    masks = torch.rand(len(rates), x0.numel(), generator=gen) < rates[:, None]
    weights = torch.tensor(trapezoid_weights(TRAP8_MASK_RATES), dtype=torch.float64) / rates.double()
    return masks, weights


def chain_rows(x0: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """Build one sequence's chain rows: row b hides blocks >= b and scores block b, conditioning it on blocks < b only."""
    positions = torch.arange(x0.numel())
    starts = torch.arange(0, x0.numel(), block)
    hidden = positions[None, :] >= starts[:, None]
    scored = hidden & (positions[None, :] < starts[:, None] + block)
    return hidden, scored, torch.ones(len(starts), dtype=torch.float64)


@dataclass
class EvalMethod:
    """One evaluation method: how many rows each sequence gets and how they are masked and weighted."""

    name: str  # elbo, chainK or trap8
    kind: str
    passes_per_seq: int
    block: int = 0  # chain block size

    def rows(self, x0: Tensor, seq_index: int, eval_seed: int) -> tuple[Tensor, Tensor, Tensor]:
        """Return (hidden, scored, weight) of the sequence's rows: positions set to [MASK], positions scored."""
        if self.name.startswith("chain"):
            return chain_rows(x0, self.block)
        gen = seeded_generator([eval_seed, seq_index, zlib.crc32(self.name.encode())])
        masks, weights = elbo_rows(x0, gen, self.passes_per_seq) if self.name == "elbo" else trap8_rows(x0, gen)
        return masks, masks, weights


def parse_eval_methods(spec: str, seq_len: int, passes: int) -> list[EvalMethod]:
    """Parse EVAL_METHOD, a comma list of elbo, trap8 and chainK."""
    methods = []
    for name in (part.strip() for part in spec.split(",")):
        if name == "elbo":
            methods.append(EvalMethod(name, METHOD_KINDS["elbo"], passes))
        elif name == "trap8":
            methods.append(EvalMethod(name, METHOD_KINDS["trap8"], len(TRAP8_MASK_RATES)))
        elif name.startswith("chain") and name[5:].isdigit() and 1 <= int(name[5:]) <= seq_len:
            block = int(name[5:])
            methods.append(EvalMethod(name, METHOD_KINDS["chain"], -(-seq_len // block), block))
        else:
            usage = f"Use elbo, trap8 or chainK with 1 <= K <= TRAIN_SEQ_LEN={seq_len}, separated by commas."
            raise InputError(f"EVAL_METHOD={spec!r}: {name!r} is not a method. {usage}")
    return methods


@dataclass
class EvalResult:
    method: EvalMethod
    val_loss: float  # nats per token
    val_bpb: float  # bits per UTF-8 byte
    stderr_bpb: float | None  # Monte Carlo standard error of val_bpb (elbo only)
    eval_ms: float
    tokens_per_s: float  # token positions run through the model per second, all ranks together


def bits_per_byte(nats: float, total_bytes: int) -> float:
    """The challenge's metric, the same for every method: code length in bits over the split's UTF-8 bytes."""
    return nats / math.log(2.0) / total_bytes


def score_rows(model: nn.Module, x0: Tensor, hidden: Tensor, scored: Tensor, mask_id: int, autocast) -> Tensor:
    """Σ −log p_θ(x₀ⁱ | x₀ with hidden positions set to [MASK]) over each row's scored positions, float64."""
    device = next(model.parameters()).device
    x0, hidden, scored = x0.to(device), hidden.to(device), scored.to(device)
    with autocast():
        logits = model(torch.where(hidden, mask_id, x0))
    nll = F.cross_entropy(logits.flatten(0, 1), x0.flatten(), reduction="none").view_as(x0)
    return (nll * scored).double().sum(dim=1).cpu()


@torch.no_grad()
def score_sequences(model: nn.Module, method: EvalMethod, val_seqs: Tensor, args, rank: int, world_size: int, autocast) -> Tensor:
    """Weighted value of every row, shape (num_seqs, passes_per_seq); a row of sequence s is rows_of(s)."""
    num_seqs, seq_len = val_seqs.shape
    passes = method.passes_per_seq
    num_rows = num_seqs * passes
    chunk_rows = max(args.eval_batch_tokens // seq_len, 1)
    values = torch.zeros(num_rows, dtype=torch.float64)
    for chunk, first in enumerate(range(0, num_rows, chunk_rows)):
        if chunk % world_size != rank:
            continue
        last = min(first + chunk_rows, num_rows)
        seqs = range(first // passes, (last - 1) // passes + 1)
        hidden, scored, weights = (torch.cat(part) for part in zip(*(method.rows(val_seqs[s], s, args.eval_seed) for s in seqs)))
        x0 = val_seqs[seqs.start : seqs.stop].repeat_interleave(passes, dim=0)
        rows = slice(first - seqs.start * passes, last - seqs.start * passes)
        values[first:last] = score_rows(model, x0[rows], hidden[rows], scored[rows], args.vocab_size, autocast) * weights[rows]
    if world_size > 1:
        device = next(model.parameters()).device
        reduced = values.to(device)
        dist.all_reduce(reduced)  # every row is non-zero on exactly one rank
        values = reduced.cpu()
    return values.view(num_seqs, passes)


def evaluate(model: nn.Module, method: EvalMethod, val_seqs: Tensor, total_bytes: int, args, rank: int, world_size: int, autocast) -> EvalResult:
    """Score the whole validation split with one method, rows shared across ranks."""
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    values = score_sequences(model, method, val_seqs, args, rank, world_size, autocast)
    model.train(was_training)
    total_nats = math.fsum(values.flatten().tolist())  # fixed order, so independent of world size
    stderr = None
    if method.name == "elbo":
        # Each half of the passes is an independent unbiased estimate, so Var(mean) ≈ (a − b)²/4.
        half = method.passes_per_seq // 2
        a, b = 2 * values[:, :half].sum(dim=1), 2 * values[:, half:].sum(dim=1)
        stderr = bits_per_byte(math.sqrt(math.fsum(((a - b) ** 2 / 4).tolist())), total_bytes)
    elapsed = time.perf_counter() - start
    return EvalResult(
        method=method,
        val_loss=total_nats / val_seqs.numel(),
        val_bpb=bits_per_byte(total_nats, total_bytes),
        stderr_bpb=stderr,
        eval_ms=1000.0 * elapsed,
        tokens_per_s=values.numel() * val_seqs.size(1) / elapsed,
    )


# -----------------------------
# SAMPLING
# -----------------------------
# MDLM ancestral sampling, α_t = 1 − t, S steps from all [MASK] (after a fixed prefix) at t = 1 to t = 0: a masked
# position is revealed from t = k/S to s = (k−1)/S with probability (α_s − α_t)/(1 − α_t) = 1/k, drawn from SUBS p_θ(x₀ | x_t).


@torch.no_grad()
def ancestral_sample(model: nn.Module, prefix: list[int], count: int, length: int, steps: int, generator) -> tuple[Tensor, int]:
    """Draw count sequences of length tokens starting with prefix; return them and the forward passes run."""
    x = torch.tensor(prefix + [model.mask_id] * (length - len(prefix)), dtype=torch.long).repeat(count, 1)
    passes = 0
    for k in range(steps, 0, -1):
        reveal = (x == model.mask_id) & (torch.rand(x.shape, generator=generator) < 1.0 / k)  # k = 1 reveals all
        if reveal.any():  # a step that reveals nothing leaves x_t and p_θ(x₀ | x_t) as they are: no pass needed
            probs = torch.softmax(model(x.to(next(model.parameters()).device)).float(), dim=-1).cpu()
            x[reveal] = torch.multinomial(probs[reveal], 1, generator=generator).squeeze(1)
            passes += 1
    return x, passes


def encode_sample_prompt(sp: spm.SentencePieceProcessor, args: Hyperparameters) -> list[int]:
    """Encode SAMPLE_PROMPT after a BOS token, so the prompt reads as the start of a document; [] without a prompt."""
    prefix = [sp.bos_id(), *sp.encode(args.sample_prompt)] if args.sample_prompt else []
    if len(prefix) >= args.sample_len:
        raise InputError(f"SAMPLE_PROMPT is {len(prefix)} tokens with BOS, which leaves none of SAMPLE_LEN={args.sample_len} to sample")
    return prefix


def log_samples(model: nn.Module, args: Hyperparameters, log0) -> None:
    """Log SAMPLE_COUNT unconditional samples, then as many after SAMPLE_PROMPT, each on one line as JSON-escaped ASCII."""
    if args.sample_count == 0:
        return
    sp, generator = load_tokenizer(args.tokenizer_path, args.vocab_size), torch.Generator().manual_seed(args.sample_seed)
    prefixes = [[], encode_sample_prompt(sp, args)] if args.sample_prompt else [[]]
    for batch, prefix in enumerate(prefixes):
        tokens, passes = ancestral_sample(model, prefix, args.sample_count, args.sample_len, args.sample_steps, generator)
        for i, row in enumerate(tokens.tolist()):
            log0(f"sample:{batch * args.sample_count + i} prompt_tokens:{len(prefix)} tokens:{len(row)} forward_passes:{passes} text:{json.dumps(sp.decode(row))}")


# -----------------------------
# OPTIMIZER
# -----------------------------
# Muon (Keller Jordan, 2024; modded-nanogpt): momentum SGD whose update for each matrix is replaced by
# the nearest semi-orthogonal matrix, approximated by a quintic Newton–Schulz iteration.


def newton_schulz5(grad: Tensor, steps: int, eps: float = 1e-7) -> Tensor:
    """Approximate U Vᵀ of grad = U S Vᵀ, for one matrix or a stack of them (batch dimension first).

    Singular values land in about [0.7, 1.2], not exactly 1, because the quintic's coefficients (3.4445, −4.7750,
    2.0315) trade exactness for a steep slope at 0."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = grad.to(torch.bfloat16 if grad.is_cuda else torch.float32)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if transposed else x


class Muon(torch.optim.Optimizer):
    """Muon with Nesterov momentum and decoupled weight decay. Matrices of one shape run through Newton–Schulz as
    one batch, split evenly over ranks and all-gathered asynchronously, so one shape's transfer overlaps the next's."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, weight_decay: float):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        distributed = dist.is_available() and dist.is_initialized()
        world_size, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        for group in self.param_groups:
            shapes = dict.fromkeys(p.shape for p in group["params"])  # in first-seen order
            same_shape = [[p for p in group["params"] if p.shape == shape] for shape in shapes]
            started = [self.start_updates(params, group, rank, world_size) for params in same_shape]
            for params, updates, transfer in started:
                if transfer is not None:
                    transfer.wait()
                rms_scale = max(1.0, params[0].size(0) / params[0].size(1)) ** 0.5  # equal update RMS for tall matrices
                torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
                torch._foreach_add_(params, list(updates[: len(params)].to(params[0].dtype).unbind()), alpha=-group["lr"] * rms_scale)

    def start_updates(self, params: list[Tensor], group: dict, rank: int, world_size: int):
        """Orthogonalize this rank's slice of same-shape params and start the all-gather of every rank's slice."""
        per_rank = -(-len(params) // world_size)
        mine = params[rank * per_rank : (rank + 1) * per_rank]
        updates = [torch.zeros_like(params[0])] * (per_rank - len(mine))  # padding, which Newton–Schulz keeps at 0
        if mine:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in mine]
            for p in mine:  # not setdefault, which would allocate a throwaway zero tensor every step
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            buffers = [self.state[p]["momentum_buffer"] for p in mine]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, grads)
            updates = [*torch._foreach_add(grads, buffers, alpha=group["momentum"]), *updates]  # Nesterov
        local = newton_schulz5(torch.stack(updates), group["backend_steps"])  # bfloat16 on GPUs
        if world_size == 1:
            return params, local, None
        gathered = local.new_empty(world_size * per_rank, *params[0].shape)
        all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)  # the old name is deprecated in torch 2.13
        return params, gathered, all_gather(gathered, local, async_op=True)


def is_control_tensor(name: str) -> bool:
    return any(part in name for part in CONTROL_TENSOR_NAMES)


def build_optimizers(model: DiffusionTransformer, args: Hyperparameters) -> list[torch.optim.Optimizer]:
    """Muon for block matrices; Adam for the embedding (EMBED_LR) and for scalars and control tensors (SCALAR_LR)."""
    matrices, scalars = [], []
    for name, p in model.named_parameters():
        if name == "tok_emb.weight":
            continue
        (matrices if p.ndim == 2 and not is_control_tensor(name) else scalars).append(p)
    adam = dict(betas=(args.beta1, args.beta2), eps=args.adam_eps, weight_decay=0.0)
    adam["fused" if model.tok_emb.weight.is_cuda else "foreach"] = True
    optimizers = [
        torch.optim.Adam([dict(params=[model.tok_emb.weight], lr=args.embed_lr, base_lr=args.embed_lr)], **adam),
        torch.optim.Adam([dict(params=scalars, lr=args.scalar_lr, base_lr=args.scalar_lr)], **adam),
        Muon(matrices, args.matrix_lr, args.muon_momentum, args.muon_backend_steps, args.muon_weight_decay),
    ]
    optimizers[2].param_groups[0]["base_lr"] = args.matrix_lr
    return optimizers


class EMA:
    """Exponential moving average of the float32 weights: ema ← d·ema + (1 − d)·w after each step.

    It starts from the weights of the step it is created at, so it carries no pull toward the
    initialization and needs no bias correction.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in model.parameters()]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)
        self.updates += 1

    @torch.no_grad()
    def copy_to_model(self) -> None:
        torch._foreach_copy_(self.params, self.shadow)


# -----------------------------
# QUANTIZATION AND EXPORT
# -----------------------------
# GPTQ-lite: per-row int8 whose clip value is searched per row over a few percentiles of |w|.
# Every 2-D weight (block linears and the tied embedding) is int8; control tensors stay float32.

CLIP_PERCENTILES = (99.9, 99.95, 99.99, 99.999, 100.0)
ARTIFACT_FORMAT = "mdlm_int8_per_row_v1"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def quantize_with_clip_search(w: Tensor) -> tuple[Tensor, Tensor]:
    """Quantize each row with the candidate clip (percentile of its |w|) of least squared error."""
    w = w.float()
    best_q, best_scale, best_err = None, None, None
    for percentile in CLIP_PERCENTILES:
        clip = w.abs().amax(dim=1) if percentile == 100.0 else torch.quantile(w.abs(), percentile / 100.0, dim=1)
        q, scale = quantize_per_row(w, clip)
        err = (dequantize_per_row(q, scale) - w).square().sum(dim=1)
        if best_err is None:
            best_q, best_scale, best_err = q, scale, err
            continue
        better = err < best_err
        best_q = torch.where(better[:, None], q, best_q)
        best_scale = torch.where(better, scale, best_scale)
        best_err = torch.minimum(err, best_err)
    return best_q, best_scale


def is_int8_tensor(name: str, tensor: Tensor) -> bool:
    return tensor.is_floating_point() and tensor.ndim == 2 and not is_control_tensor(name)


def quantize_state_dict(state: dict[str, Tensor]) -> dict:
    artifact = {"format": ARTIFACT_FORMAT, "int8": {}, "scales": {}, "float": {}}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        if is_int8_tensor(name, tensor):
            artifact["int8"][name], artifact["scales"][name] = quantize_with_clip_search(tensor)
        else:
            artifact["float"][name] = tensor.float().contiguous()
    return artifact


def dequantize_state_dict(artifact: dict) -> dict[str, Tensor]:
    state = {name: dequantize_per_row(q, artifact["scales"][name]) for name, q in artifact["int8"].items()}
    state.update(artifact["float"])
    return state


def compress(raw: bytes, compressor: str) -> bytes:
    if compressor == "zstd":
        import zstandard  # optional dependency, imported only when EXPORT_COMPRESSOR=zstd

        return zstandard.ZstdCompressor(level=22).compress(raw)
    return zlib.compress(raw, level=9)


def decompress(blob: bytes) -> bytes:
    if blob.startswith(ZSTD_MAGIC):
        import zstandard

        return zstandard.ZstdDecompressor().decompress(blob)
    return zlib.decompress(blob)


def export_artifact(model: DiffusionTransformer, compressor: str) -> bytes:
    buffer = io.BytesIO()
    torch.save({**quantize_state_dict(model.state_dict()), "settings": model.settings}, buffer)
    return compress(buffer.getvalue(), compressor)


def load_artifact(blob: bytes) -> tuple[dict[str, Tensor], dict]:
    """Return the dequantized state dict and the settings the model was trained with."""
    artifact = torch.load(io.BytesIO(decompress(blob)), map_location="cpu", weights_only=True)
    if artifact.get("format") != ARTIFACT_FORMAT:
        raise InputError(f"artifact format {artifact.get('format')!r} is not {ARTIFACT_FORMAT}")
    return dequantize_state_dict(artifact), artifact["settings"]


# -----------------------------
# TRAINING LOOP
# -----------------------------


@dataclass
class Runtime:
    """The process's rank, device and compile setting."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    compile: bool

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def remaining_steps(step: int, elapsed_ms: float, args: Hyperparameters) -> float:
    """Estimate the steps left: ITERATIONS − step, or fewer if the wallclock cap comes first at the pace so far."""
    left = float(args.iterations - step)
    if args.max_wallclock_seconds > 0 and step > 0:
        ms_left = max(1000.0 * args.max_wallclock_seconds - elapsed_ms, 0.0)
        left = min(left, ms_left / (elapsed_ms / step))
    return max(left, 0.0)


def lr_scale(step: int, elapsed_ms: float, args: Hyperparameters) -> float:
    """LR multiplier: 1, then linear to 0 over the last WARMDOWN_ITERS steps.

    A run expected to be shorter than WARMDOWN_ITERS decays over its whole length, from 1 at the start
    to 0 at the cap, instead of starting part-way down the ramp.
    """
    left = remaining_steps(step, elapsed_ms, args)
    warmdown = min(float(args.warmdown_iters), step + left)
    return 1.0 if warmdown <= 0 else min(left / warmdown, 1.0)


def muon_momentum(step: int, args: Hyperparameters) -> float:
    """Muon momentum, linear from MUON_MOMENTUM_WARMUP_START to MUON_MOMENTUM over the warmup steps."""
    frac = min(step / args.muon_momentum_warmup_steps, 1.0) if args.muon_momentum_warmup_steps else 1.0
    return (1 - frac) * args.muon_momentum_warmup_start + frac * args.muon_momentum


def max_across_ranks(value: float, runtime: Runtime) -> float:
    """Agree on one value (rank clocks differ slightly) so every rank applies the same LR and stops together."""
    if not runtime.distributed:
        return value
    # NOTE: this is one host sync per step on multi-rank runs, the price of a shared LR and stop step.
    tensor = torch.tensor(value, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


class Trainer:
    """The optimization loop: micro-batches, optimizer steps, schedule, QAT and EMA switches, logging."""

    def __init__(self, args, runtime, model, train_model, loader_factory, evaluate_fn, log0):
        self.args, self.runtime = args, runtime
        self.model, self.train_model = model, train_model  # the bare model, and its (x0, t, u) -> loss wrapper
        self.loader_factory = loader_factory
        self.loader = loader_factory()
        self.prefetched: Tensor | None = None  # the next step's batch, read while the device runs this one
        self.evaluate_fn, self.log0 = evaluate_fn, log0
        self.optimizers = build_optimizers(model, args)
        self.seqs_per_rank, self.accum_steps = args.check_batch(runtime.world_size)
        self.ema: EMA | None = None
        self.last_logged_step = 0

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def micro_batches(self, batch: Tensor, step: int):
        """Split this rank's rows into (x0, t, u) micro-batches, with t and u cut from the draw for the whole global batch."""
        seqs, rank, args = self.seqs_per_rank, self.runtime.rank, self.args
        t, u = draw_mask_noise(args.seed, step, seqs * self.runtime.world_size, args.train_seq_len, args.noise_eps, batch.device)
        own = slice(rank * seqs, (rank + 1) * seqs)
        return zip(*(rows.chunk(self.accum_steps) for rows in (batch, t[own], u[own])))

    def train_step(self, step: int, scale: float) -> Tensor:
        """One optimizer step over this rank's share of the global batch; returns the mean loss (no sync)."""
        batch = self.prefetched if self.prefetched is not None else self.loader.next_batch()
        total = torch.zeros((), device=self.runtime.device)
        for i, micro in enumerate(self.micro_batches(batch, step)):
            defer_sync = self.runtime.distributed and i < self.accum_steps - 1  # all-reduce after the last micro-batch only
            with self.train_model.no_sync() if defer_sync else nullcontext():
                with self.runtime.autocast():
                    loss = self.train_model(*micro)
                (loss / self.accum_steps).backward()
            total += loss.detach()
        self.prefetched = self.loader.next_batch()  # host work and copy overlap the queued device work
        for group in self.optimizers[2].param_groups:
            group["momentum"] = muon_momentum(step, self.args)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
        if self.args.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip_norm)
        for opt in self.optimizers:
            opt.step()
        self.zero_grad()
        return total / self.accum_steps

    def warm_up(self) -> None:
        """Compile and run WARMUP_STEPS steps (the later half with QAT on), then restore the initial state."""
        steps = self.args.warmup_steps
        if steps == 0 or not (self.runtime.compile or self.runtime.device.type == "cuda"):
            self.log0(f"warmup:skipped steps:{steps} reason:{'none_requested' if steps == 0 else 'eager_cpu'}")
            return
        model_state = copy.deepcopy(self.model.state_dict())
        optimizer_states = [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]
        for i in range(steps):
            self.model.set_qat(self.args.qat_start_lr_scale > 0 and i >= steps // 2)
            self.train_step(0, 1.0)
            self.log0(f"warmup_step:{i + 1}/{steps} qat:{int(self.model.qat)}")
        self.model.set_qat(False)
        self.model.load_state_dict(model_state)
        for opt, state in zip(self.optimizers, optimizer_states):
            opt.load_state_dict(state)
        self.loader, self.prefetched = self.loader_factory(), None

    def log_validation(self, step: int, train_ms: float) -> None:
        result = self.evaluate_fn(self.model)
        self.log0(
            f"step:{step}/{self.args.iterations} val_loss:{result.val_loss:.4f} val_bpb:{result.val_bpb:.4f} "
            f"estimator:{result.method.name} train_time:{train_ms:.0f}ms eval_time:{result.eval_ms:.0f}ms"
        )

    def update_late_phase(self, step: int, scale: float) -> None:
        """Switch on QAT and start the EMA once the LR multiplier drops to their thresholds."""
        if not self.model.qat and scale < self.args.qat_start_lr_scale:
            self.model.set_qat(True)
            self.log0(f"qat:enabled step:{step} lr_scale:{scale:.4f}")
        if self.ema is None and self.args.ema_start_lr_scale > 0 and scale <= self.args.ema_start_lr_scale:
            self.ema = EMA(self.model, self.args.ema_decay)
            self.log0(f"ema:started step:{step} lr_scale:{scale:.4f} decay:{self.args.ema_decay}")

    def run(self) -> int:
        """Train until ITERATIONS or the wallclock cap; return the number of steps taken."""
        args, runtime, log0 = self.args, self.runtime, self.log0
        train_ms, step = 0.0, 0
        runtime.synchronize()
        t0 = time.perf_counter()
        while True:
            elapsed_ms = max_across_ranks(train_ms + 1000.0 * (time.perf_counter() - t0), runtime)
            capped = args.max_wallclock_seconds > 0 and elapsed_ms >= 1000.0 * args.max_wallclock_seconds
            last = step >= args.iterations or capped
            if last and step > 0 and step != self.last_logged_step and args.train_log_every > 0:
                self.log_train_step(step, loss, scale, t0, train_ms)
            if args.val_loss_every > 0 and (last or step % args.val_loss_every == 0):
                runtime.synchronize()
                train_ms += 1000.0 * (time.perf_counter() - t0)
                self.log_validation(step, train_ms)  # evaluation time is not training time
                t0 = time.perf_counter()
            if last:
                if capped and step < args.iterations:
                    log0(f"stopping_early:wallclock_cap train_time:{elapsed_ms:.0f}ms step:{step}/{args.iterations}")
                return step
            scale = lr_scale(step, elapsed_ms, args)
            self.update_late_phase(step, scale)
            loss = self.train_step(step, scale)
            if self.ema is not None:
                self.ema.update()
            step += 1
            if args.train_log_every > 0 and (step == 1 or step % args.train_log_every == 0):
                self.log_train_step(step, loss, scale, t0, train_ms)

    def log_train_step(self, step: int, loss: Tensor, scale: float, t0: float, train_ms: float) -> None:
        """Log a step line; the loss is averaged over ranks, which syncs the device before the clock is read."""
        self.last_logged_step = step
        if self.runtime.distributed:
            dist.all_reduce(loss)  # gloo has no AVG
        loss_value = loss.item() / self.runtime.world_size
        train_ms += 1000.0 * (time.perf_counter() - t0)
        step_ms = train_ms / step
        tokens_per_s = step * self.args.train_batch_tokens / (train_ms / 1000.0)
        eta_s = remaining_steps(step, train_ms, self.args) * step_ms / 1000.0
        self.log0(
            f"step:{step}/{self.args.iterations} train_loss:{loss_value:.4f} lr_scale:{scale:.4f} "
            f"train_time:{train_ms:.0f}ms step_avg:{step_ms:.2f}ms tok_s:{tokens_per_s:.0f} eta:{eta_s:.0f}s"
        )


# -----------------------------
# MAIN
# -----------------------------


def init_runtime(args: Hyperparameters) -> Runtime:
    """Join the torchrun group if there is one (NCCL on GPUs, gloo on CPU) and pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise InputError("DEVICE=cuda but no CUDA device is available")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    compile_model = args.torch_compile == "1" or (args.torch_compile == "auto" and use_cuda)
    return Runtime(rank, world_size, local_rank, device, compile_model)


def make_logger(args: Hyperparameters, runtime: Runtime):
    """Return log0: rank 0 prints and appends to logs/<RUN_ID>.txt; other ranks stay silent."""
    path = Path("logs") / f"{args.run_id}.txt"
    if runtime.is_master:
        path.parent.mkdir(exist_ok=True)

    def log0(message: str, console: bool = True) -> None:
        if not runtime.is_master:
            return
        if console:
            print(message, flush=True)
        with path.open("a", encoding="utf-8") as f:
            print(message, file=f)

    return log0


def log_environment(code: str, runtime: Runtime, log0) -> None:
    log0(code, console=False)
    log0("=" * 100, console=False)
    log0(f"python:{platform.python_version()} torch:{torch.__version__} device:{runtime.device.type} world_size:{runtime.world_size} compile:{int(runtime.compile)}")
    if runtime.device.type == "cuda" and shutil.which("nvidia-smi"):
        log0(subprocess.run(["nvidia-smi"], capture_output=True, text=True, check=False).stdout, console=False)


def check_validation_inputs(args: Hyperparameters, log0) -> tuple[Tensor, int]:
    """Validate the tokenizer and the validation shards; return the split's sequences and UTF-8 byte count."""
    sp = load_tokenizer(args.tokenizer_path, args.vocab_size)
    encode_sample_prompt(sp, args)  # a SAMPLE_PROMPT too long for SAMPLE_LEN fails here, not after training
    start = time.perf_counter()
    val_files = find_shards(args.val_files, "validation")
    check_shards(val_files, args.vocab_size)
    val_seqs = load_validation_tokens(val_files, args.train_seq_len)
    if int(val_seqs[0, 0]) != sp.bos_id():
        raise InputError(
            f"the validation split {val_files[0]} starts with token {int(val_seqs[0, 0])}, not the BOS id "
            f"{sp.bos_id()} of tokenizer {args.tokenizer_path}: the shards were made with another tokenizer"
        )
    total_bytes = int(count_token_bytes(val_seqs.flatten().numpy(), build_byte_tables(sp)).sum())
    log0(f"tokenizer:{args.tokenizer_path} vocab_size:{sp.vocab_size()}")
    log0(
        f"val_shards:{len(val_files)} val_tokens:{val_seqs.numel()} val_seqs:{len(val_seqs)} val_bytes:{total_bytes} "
        f"check_time:{1000.0 * (time.perf_counter() - start):.0f}ms"
    )
    return val_seqs, total_bytes


def check_training_inputs(args: Hyperparameters, log0) -> list[str]:
    """Validate every training shard and the export settings; return the shard paths."""
    if args.export_compressor == "zstd":
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise InputError("EXPORT_COMPRESSOR=zstd needs the zstandard package: pip install zstandard") from None
    start = time.perf_counter()
    train_files = find_shards(args.train_files, "training")
    train_tokens = check_shards(train_files, args.vocab_size)
    if train_tokens == 0:
        raise InputError(f"the training shards matching {args.train_files} hold no tokens")
    check_ms = 1000.0 * (time.perf_counter() - start)
    log0(f"train_shards:{len(train_files)} train_tokens:{train_tokens} data_path:{args.data_path} check_time:{check_ms:.0f}ms")
    return train_files


def import_record_writer(args: Hyperparameters, code: str):
    """Import records/record_writer.py (tooling beside the script) and check RECORD_DIR before any training."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "records"))
    try:
        import record_writer
        record_writer.check_record_dir(args.record_dir, code, args.seed, args.parse_eval_methods()[0].name)
    except (ImportError, ValueError, OSError) as error:
        raise InputError(f"RECORD_DIR={args.record_dir} is unusable (it also needs records/record_writer.py beside the script): {error}") from None
    return record_writer


def build_model(args: Hyperparameters, runtime: Runtime) -> DiffusionTransformer:
    return DiffusionTransformer(args).to(runtime.device)


def build_train_model(model: DiffusionTransformer, args: Hyperparameters, runtime: Runtime) -> nn.Module:
    """Wrap the model into the (x0, t, u) -> loss module that Trainer steps: one graph (fullgraph) when compiled, then DDP.
    The only buffers, the RoPE tables, are built alike on every rank, so DDP skips broadcasting them each forward."""
    train_model = DiffusionObjective(model, args.noise_eps)
    if runtime.compile:
        train_model = torch.compile(train_model, fullgraph=True, dynamic=False)
    if runtime.distributed:
        train_model = DDP(train_model, device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None, broadcast_buffers=False)
    return train_model


def log_peak_memory(runtime: Runtime, log0) -> None:
    if runtime.device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(runtime.device) // 2**20
        reserved = torch.cuda.max_memory_reserved(runtime.device) // 2**20
        log0(f"peak_memory_allocated:{allocated}MiB peak_memory_reserved:{reserved}MiB")
    else:
        import resource

        log0(f"peak_rss:{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}MiB")


def write_artifact(model: nn.Module, code: str, args: Hyperparameters, runtime: Runtime, log0) -> str:
    """Rank 0 writes final_model.int8.ptz and logs its size next to the code size, as the challenge counts them."""
    path = "final_model.int8.ptz"
    label = f"int8+{args.export_compressor}"
    if runtime.is_master:
        blob = export_artifact(model, args.export_compressor)
        Path(path).write_bytes(blob)
        code_bytes = len(code.encode("utf-8"))
        total = len(blob) + code_bytes
        log0(f"Serialized model {label}: {len(blob)} bytes")
        log0(f"Code size: {code_bytes} bytes")
        log0(f"Total submission size {label}: {total} bytes")
        if total > 16_000_000:
            log0(f"WARNING: total submission size {total} bytes exceeds the 16,000,000-byte limit by {total - 16_000_000} bytes")
    if runtime.distributed:
        dist.barrier()
    return path


def load_artifact_model(path: str, args: Hyperparameters, runtime: Runtime) -> tuple[DiffusionTransformer, str]:
    """Build a fresh model from an artifact on rank 0's disk; return it and the artifact's compressor.

    Rank 0 reads the file and sends the bytes to all ranks, which need no shared filesystem.
    """
    payload = [Path(path).read_bytes() if runtime.is_master and os.path.isfile(path) else None]
    if runtime.distributed:
        dist.broadcast_object_list(payload, src=0)
    if payload[0] is None:
        raise InputError(f"artifact not found: {path}")
    model = build_model(args, runtime)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state, settings = load_artifact(payload[0])
    for name, value in settings.items():
        if model.settings[name] != value:
            raise InputError(f"artifact {path} was trained with {name}={value} but {name}={model.settings[name]} is set: set it as in that run")
    found = {name: tuple(t.shape) for name, t in state.items()}
    if found != expected:
        name = sorted(set(found) ^ set(expected) or {n for n in found if found[n] != expected[n]})[0]
        raise InputError(
            f"artifact {path} does not fit the model settings: tensor {name} has shape {found.get(name, 'absent')} "
            f"in the artifact but {expected.get(name, 'absent')} in the model; set NUM_LAYERS, MODEL_DIM, NUM_HEADS, "
            "NUM_KV_HEADS, MLP_MULT, VOCAB_SIZE and UNET_SKIPS as in the run that wrote it"
        )
    model.load_state_dict(state)
    return model, "zstd" if payload[0].startswith(ZSTD_MAGIC) else "zlib"


def log_final_results(results: list[EvalResult], compressor: str, log0) -> None:
    """The challenge's final lines for the first method, then one line per method."""
    first, prefix = results[0], f"final_int8_{compressor}_roundtrip"
    log0(
        f"{prefix} val_loss:{first.val_loss:.4f} val_bpb:{first.val_bpb:.4f} eval_time:{first.eval_ms:.0f}ms "
        f"estimator:{first.method.name} kind:{first.method.kind}"
    )
    log0(f"{prefix}_exact val_loss:{first.val_loss:.8f} val_bpb:{first.val_bpb:.8f}")
    for result in results:
        stderr = "" if result.stderr_bpb is None else f" stderr:{result.stderr_bpb:.8f}"
        log0(
            f"eval_method:{result.method.name} val_loss:{result.val_loss:.8f} val_bpb:{result.val_bpb:.8f}{stderr} "
            f"passes_per_seq:{result.method.passes_per_seq} eval_time:{result.eval_ms:.0f}ms "
            f"eval_tok_s:{result.tokens_per_s:.0f} kind:{result.method.kind}"
        )


def train_and_export(args: Hyperparameters, runtime: Runtime, code: str, evaluate_first, log0) -> tuple[str, int]:
    """Train, swap in the EMA, write the artifact; return its path and the steps taken."""
    train_files = check_training_inputs(args, log0)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = build_model(args, runtime)
    train_model = build_train_model(model, args, runtime)
    seqs_per_rank, accum_steps = args.check_batch(runtime.world_size)
    log0(f"model_params:{sum(p.numel() for p in model.parameters())} block_schedule:{','.join(map(str, model.block_schedule()))}")
    log0(
        f"train_batch_tokens:{args.train_batch_tokens} train_seq_len:{args.train_seq_len} seqs_per_rank:{seqs_per_rank} "
        f"grad_accum_steps:{accum_steps} iterations:{args.iterations} max_wallclock_seconds:{args.max_wallclock_seconds:g} "
        f"warmdown_iters:{args.warmdown_iters} noise_eps:{args.noise_eps} seed:{args.seed}"
    )

    def loader_factory() -> TrainLoader:
        return TrainLoader(train_files, runtime.rank, runtime.world_size, seqs_per_rank, args.train_seq_len, runtime.device)

    trainer = Trainer(args, runtime, model, train_model, loader_factory, evaluate_first, log0)
    trainer.warm_up()
    steps = trainer.run()
    log_peak_memory(runtime, log0)
    model.set_qat(False)
    if trainer.ema is not None:
        trainer.ema.copy_to_model()
        log0(f"ema:swapped_in decay:{args.ema_decay} steps_averaged:{trainer.ema.updates}")
    else:
        log0(f"ema:not_used reason:lr_scale_never_reached_{args.ema_start_lr_scale} steps:{steps}")
    return write_artifact(model, code, args, runtime, log0), steps


def main() -> None:
    code = Path(__file__).read_text(encoding="utf-8")
    args = Hyperparameters()
    methods = args.parse_eval_methods()
    record_writer = import_record_writer(args, code) if args.record_dir else None
    if not args.eval_only:
        args.check_batch(int(os.environ.get("WORLD_SIZE", "1")))  # before joining the process group
    runtime = init_runtime(args)
    log0 = make_logger(args, runtime)
    log_environment(code, runtime, log0)
    val_seqs, total_bytes = check_validation_inputs(args, log0)

    def evaluate_all(eval_model: nn.Module, first_only: bool = False) -> list[EvalResult]:
        scored = torch.compile(eval_model) if runtime.compile else eval_model
        return [
            evaluate(scored, method, val_seqs, total_bytes, args, runtime.rank, runtime.world_size, runtime.autocast)
            for method in methods[: 1 if first_only else None]
        ]

    if args.eval_only:
        log0(f"eval_only:{args.eval_only}")
        path, steps = args.eval_only, 0
    else:
        path, steps = train_and_export(args, runtime, code, lambda m: evaluate_all(m, first_only=True)[0], log0)
    model, compressor = load_artifact_model(path, args, runtime)
    log_final_results(evaluate_all(model), compressor, log0)
    log_samples(model, args, log0)
    if runtime.distributed:
        gc.collect()  # free the DDP wrapper's cycles so gloo's threads stop before exit, which they can abort
        dist.destroy_process_group()
    if record_writer is not None and runtime.is_master:
        log0(record_writer.write_record(args, runtime, code, steps))


if __name__ == "__main__":
    try:
        main()
    except InputError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
