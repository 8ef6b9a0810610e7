"""Shared fixtures: the script as a module, tiny shards cut from the bundled sample, one trained run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "train_mdlm.py"
SAMPLE = REPO / "data" / "datasets" / "fineweb_sample_sp1024"
TOKENIZER = REPO / "data" / "tokenizers" / "fineweb_1024_bpe.model"

sys.path.insert(0, str(REPO))
import train_mdlm  # noqa: E402

# A model small enough to train for 60 steps in about 15 seconds on two CPU cores, with every part of
# the default layout: an encoder half of 2 blocks, block 1 run once more, 2 U-Net skips and GQA.
TINY_ENV = {
    "NUM_LAYERS": "4",
    "MODEL_DIM": "64",
    "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2",
    "UNET_SKIPS": "2",
    "LOOP_START": "1",
    "LOOP_END": "2",
    "TRAIN_SEQ_LEN": "64",
    "TRAIN_BATCH_TOKENS": "4096",
    "EVAL_BATCH_TOKENS": "4096",
    "EVAL_PASSES": "16",
    "ITERATIONS": "60",
    "WARMDOWN_ITERS": "60",
    "MAX_WALLCLOCK_SECONDS": "0",
    "TRAIN_LOG_EVERY": "20",
    "VAL_LOSS_EVERY": "0",
    "MATRIX_LR": "0.06",
    "EMBED_LR": "0.2",
    "SEED": "7",
}


def write_shard(path: Path, tokens, magic: int = 20240520, version: int = 1, count: int | None = None) -> Path:
    """Write a shard in the challenge's format: 256 int32 header (magic, version, count), uint16 tokens."""
    tokens = np.asarray(tokens, dtype="<u2")
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, len(tokens) if count is None else count)
    path.write_bytes(header.tobytes() + tokens.tobytes())
    return path


def sample_tokens(name: str) -> np.ndarray:
    return np.fromfile(SAMPLE / name, dtype="<u2", offset=1024)


def make_dataset(folder: Path, train_tokens: int = 60_000, val_tokens: int = 4096) -> Path:
    """Two training shards and one validation shard cut from the bundled sample."""
    folder.mkdir(parents=True, exist_ok=True)
    train = sample_tokens("fineweb_train_000000.bin")
    half = train_tokens // 2
    write_shard(folder / "fineweb_train_000000.bin", train[:half])
    write_shard(folder / "fineweb_train_000001.bin", train[half:train_tokens])
    write_shard(folder / "fineweb_val_000000.bin", sample_tokens("fineweb_val_000000.bin")[:val_tokens])
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tiny_data"))


# Every env var the script reads, so that a developer's shell settings cannot leak into a test.
SCRIPT_ENV_NAMES = set(re.findall(r'"([A-Z][A-Z0-9_]+)"', SCRIPT.read_text())) | {"DEVICE", "RANK", "WORLD_SIZE", "LOCAL_RANK"}


def script_env(data: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV_NAMES}
    env.update(TINY_ENV)
    env.update(DATA_PATH=str(data), TOKENIZER_PATH=str(TOKENIZER), RUN_ID="test", OMP_NUM_THREADS="1")
    env.update(overrides)
    return env


def expect_input_error(monkeypatch, workdir: Path, env: dict[str, str], message: str) -> str:
    """Run main() in-process with exactly env's script settings; return the InputError text, which must contain message."""
    for name in SCRIPT_ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(workdir)
    with pytest.raises(train_mdlm.InputError) as error:
        train_mdlm.main()
    assert message in str(error.value)
    return str(error.value)


def run_script(env: dict[str, str], cwd: Path, nproc: int | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    if nproc is None:
        command = [sys.executable, str(SCRIPT)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(SCRIPT)]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def parse_fields(line: str) -> dict[str, str]:
    """Parse the key:value pairs of one log line."""
    return dict(field.split(":", 1) for field in line.split() if ":" in field)


def final_line(stdout: str, suffix: str = "") -> dict[str, str]:
    prefix = f"final_int8_zlib_roundtrip{suffix} "
    lines = [line for line in stdout.splitlines() if line.startswith(prefix)]
    assert lines, f"no line starting with {prefix!r} in output:\n{stdout[-3000:]}"
    return parse_fields(lines[-1])


class TrainedRun:
    """One finished single-process run of the script on the tiny dataset."""

    def __init__(self, workdir: Path, env: dict[str, str], result: subprocess.CompletedProcess):
        self.workdir, self.env, self.result = workdir, env, result
        self.stdout = result.stdout
        self.artifact = workdir / "final_model.int8.ptz"
        self.log_file = workdir / "logs" / "test.txt"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_data) -> TrainedRun:
    workdir = tmp_path_factory.mktemp("trained_run")
    env = script_env(tiny_data, VAL_LOSS_EVERY="60", EVAL_METHOD="elbo,chain16,trap8")
    result = run_script(env, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return TrainedRun(workdir, env, result)
