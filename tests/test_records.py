"""Record folders: RECORD_DIR writes the challenge's layout from the run's own log, and seeds merge."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import sentencepiece as spm
import torch

import train_mdlm
from conftest import REPO, SCRIPT, TOKENIZER, expect_input_error, run_script, script_env

sys.path.insert(0, str(REPO / "records"))
from record_writer import build_readme, check_record_dir, mean_and_std, merge_runs, render_curves, write_record  # noqa: E402
from run_log import SEPARATOR, last_run_text, parse_number  # noqa: E402

RECORD = "records/track_non_record_16mb/2026-01-01_tiny"
RECORD_ENV = {
    "ITERATIONS": "6",
    "WARMDOWN_ITERS": "6",
    "TRAIN_LOG_EVERY": "3",
    "VAL_LOSS_EVERY": "3",
    "SAMPLE_COUNT": "2",
    "SAMPLE_LEN": "24",
    "SAMPLE_STEPS": "12",
    "SAMPLE_PROMPT": "Once upon a time",
    "RECORD_DIR": RECORD,
    "RECORD_AUTHOR": "Ada Lovelace",
    "RECORD_GITHUB_ID": "ada",
    "RECORD_NAME": "Tiny MDLM",
    "RECORD_BLURB": "Two seeds of a tiny model.",
}
SEEDS = ("1", "2")


class RecordRun:
    """One finished run into the shared record folder."""

    def __init__(self, seed: str, stdout: str, folder: Path):
        self.seed, self.folder = seed, folder
        self.lines = stdout.splitlines()

    def value(self, prefix: str, key: str) -> str:
        line = next(line for line in self.lines if line.startswith(prefix))
        return dict(word.split(":", 1) for word in line.split() if ":" in word)[key]

    def size(self, label: str) -> int:
        line = next(line for line in self.lines if line.startswith(label))
        return int(line.split()[-2])


@pytest.fixture(scope="module")
def record_runs(tmp_path_factory, tiny_data) -> list[RecordRun]:
    """Two seeds of a 6-step run into one record folder, with the same RUN_ID, so the log contains both."""
    workdir = tmp_path_factory.mktemp("record_runs")
    runs = []
    for seed in SEEDS:
        result = run_script(script_env(tiny_data, SEED=seed, **RECORD_ENV), workdir)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(RecordRun(seed, result.stdout, workdir / RECORD))
    return runs


@pytest.fixture(scope="module")
def submission(record_runs) -> dict:
    return json.loads((record_runs[0].folder / "submission.json").read_text())


def test_submission_has_challenge_fields(submission):
    challenge = ["author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb", "bytes_total", "bytes_code"]
    assert list(submission)[:9] == challenge
    assert submission["author"] == "Ada Lovelace"
    assert submission["github_id"] == "ada"
    assert submission["name"] == "Tiny MDLM"
    assert submission["blurb"] == "Two seeds of a tiny model."
    assert datetime.strptime(submission["date"], "%Y-%m-%dT%H:%M:%SZ")
    assert isinstance(submission["val_bpb"], float)
    assert isinstance(submission["bytes_total"], int)


def test_submission_numbers_come_from_logs(record_runs, submission):
    bpbs = [float(run.value("final_int8_zlib_roundtrip_exact", "val_bpb")) for run in record_runs]
    losses = [float(run.value("final_int8_zlib_roundtrip_exact", "val_loss")) for run in record_runs]
    totals = [run.size("Total submission size int8+zlib:") for run in record_runs]
    assert submission["val_bpb"] == pytest.approx((bpbs[0] + bpbs[1]) / 2, abs=1e-8)
    assert submission["val_loss"] == pytest.approx((losses[0] + losses[1]) / 2, abs=1e-8)
    assert submission["bytes_total"] == max(totals)
    assert submission["bytes_code"] == len(SCRIPT.read_bytes())


def test_two_seeds_merge_mean_and_std(record_runs, submission):
    bpbs = [float(run.value("final_int8_zlib_roundtrip_exact", "val_bpb")) for run in record_runs]
    extras = submission["extras"]
    assert extras["seeds"] == [1, 2]
    # The sample standard deviation of two values is |a − b| / √2.
    assert extras["val_bpb_std"] == pytest.approx(abs(bpbs[0] - bpbs[1]) / math.sqrt(2), abs=1e-8)
    assert [run["val_bpb"] for run in extras["runs"]] == bpbs


def test_extras_record_each_seed(record_runs, submission):
    for run, entry in zip(record_runs, submission["extras"]["runs"]):
        last_step = [line for line in run.lines if line.startswith("step:6/6 train_loss")][0]
        assert entry["seed"] == int(run.seed)
        assert entry["steps"] == 6
        assert entry["train_time_ms"] == float(last_step.split("train_time:")[1].split("ms")[0])
        assert entry["estimator"] == run.value("final_int8_zlib_roundtrip ", "estimator")
        assert entry["hardware"].startswith("1x CPU process")
        assert f"SEED={run.seed} " in entry["command"]
        assert f"RECORD_DIR={RECORD} " in entry["command"]
        assert entry["command"].endswith("python3 train_mdlm.py")
        assert entry["log"] == f"train_seed{run.seed}.log"


def test_record_folder_holds_script_and_logs(record_runs):
    folder = record_runs[0].folder
    assert (folder / "train_mdlm.py").read_bytes() == SCRIPT.read_bytes()
    for run in record_runs:
        log = (folder / f"train_seed{run.seed}.log").read_text()
        assert log.startswith(SCRIPT.read_text())
        assert log.count(SEPARATOR) == 1  # this seed's run only, though logs/test.txt contains both
        assert run.lines[-2] in log  # the last sample line; the record line comes after the copy


def test_readme_table_lists_each_seed(record_runs, submission):
    readme = (record_runs[0].folder / "README.md").read_text()
    for run in record_runs:
        bpb = run.value("final_int8_zlib_roundtrip_exact", "val_bpb")
        assert f"| {run.seed} | 6 |" in readme
        assert f"| {bpb} |" in readme
    assert f"| **mean** | | | {submission['val_loss']:.8f} | {submission['val_bpb']:.8f} |" in readme
    assert f"| **sample std** | | | {submission['extras']['val_loss_std']:.8f} |" in readme


def test_readme_shows_samples(record_runs):
    readme = (record_runs[0].folder / "README.md").read_text()
    for run in record_runs:
        for line in run.lines:
            if line.startswith("sample:"):
                assert json.loads(line.partition(" text:")[2]) in readme


def test_sample_lines_decode_as_json(record_runs):
    lines = [line for line in record_runs[0].lines if line.startswith("sample:")]
    texts = [json.loads(line.partition(" text:")[2]) for line in lines]
    assert len(lines) == 4  # SAMPLE_COUNT=2 unconditional, then 2 after the prompt
    assert all(line.isascii() for line in lines)
    prompt_tokens = 1 + len(spm.SentencePieceProcessor(model_file=str(TOKENIZER)).encode("Once upon a time"))  # BOS first
    assert [line.split()[1] for line in lines[:2]] == ["prompt_tokens:0"] * 2
    assert [line.split()[1] for line in lines[2:]] == [f"prompt_tokens:{prompt_tokens}"] * 2
    assert all(text.startswith("Once upon a time") for text in texts[2:])


def test_record_line_ends_log(record_runs):
    last = record_runs[1].lines[-1]
    assert last.startswith(f"record:written dir:{RECORD} seeds:2 ")


def test_loss_curves_png_written(record_runs):
    pytest.importorskip("matplotlib", exc_type=ImportError)
    folder = record_runs[0].folder
    assert (folder / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](loss_curves.png)" in (folder / "README.md").read_text()


def test_record_without_matplotlib_has_no_png(monkeypatch, record_runs, submission, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert render_curves(tmp_path, submission["extras"]["runs"]) is False
    assert not (tmp_path / "loss_curves.png").exists()
    assert "loss_curves.png" not in build_readme(record_runs[0].folder, submission, png_written=False)


def test_mean_and_sample_std():
    mean, std = mean_and_std([1.0, 1.2, 1.4])
    assert mean == pytest.approx(1.2)
    assert std == pytest.approx(0.2)  # squared deviations 0.04 + 0 + 0.04, over n − 1 = 2


def test_single_seed_has_no_std():
    assert mean_and_std([3.5]) == (3.5, None)


def test_same_seed_replaces_entry():
    runs = [{"seed": 2, "val_bpb": 1.0}, {"seed": 7, "val_bpb": 2.0}]
    merged = merge_runs(runs, {"seed": 2, "val_bpb": 1.5})
    assert merged == [{"seed": 2, "val_bpb": 1.5}, {"seed": 7, "val_bpb": 2.0}]


def test_last_run_text_skips_earlier_run():
    code = "print(1)\n"
    log = f"{code}\n{SEPARATOR}\nstep:1/2 a:1\n{code}\n{SEPARATOR}\nstep:2/2 a:2\n"
    assert last_run_text(log, code) == f"{code}\n{SEPARATOR}\nstep:2/2 a:2\n"
    assert last_run_text(log) == f"{SEPARATOR}\nstep:2/2 a:2\n"


def test_record_dir_of_other_script_rejected(monkeypatch, tmp_path, tiny_data):
    folder = tmp_path / "record"
    folder.mkdir()
    (folder / "train_mdlm.py").write_text("print('another script')\n")
    text = expect_input_error(monkeypatch, tmp_path, script_env(tiny_data, RECORD_DIR=str(folder)), "is a different script")
    assert text.startswith(f"RECORD_DIR={folder} is unusable")
    assert not (tmp_path / "logs").exists()  # stopped before the logger started


def test_missing_record_writer_rejected(tmp_path, tiny_data):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(SCRIPT, alone / "train_mdlm.py")
    env = script_env(tiny_data, RECORD_DIR=str(tmp_path / "record"))
    result = subprocess.run([sys.executable, str(alone / "train_mdlm.py")], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "RECORD_DIR=" in result.stderr
    assert "No module named 'record_writer'" in result.stderr
    assert "step:" not in result.stdout
    assert not (tmp_path / "record").exists()


def test_record_dir_with_foreign_readme_rejected(tmp_path):
    (tmp_path / "README.md").write_text("# Another project\n")
    with pytest.raises(ValueError, match="choose a new RECORD_DIR such as records/track_non_record_16mb/<date>_<name>"):
        check_record_dir(str(tmp_path), "print('a script')\n")
    assert (tmp_path / "README.md").read_text() == "# Another project\n"
    # RECORD_DIR=. and RECORD_DIR=records from the repository root, whose README.md the record would overwrite.
    with pytest.raises(ValueError, match="without a submission.json"):
        check_record_dir(str(REPO), SCRIPT.read_text())
    with pytest.raises(ValueError, match="without a submission.json"):
        check_record_dir(str(REPO / "records"), SCRIPT.read_text())


FAKE_CODE = "print('a finished run')\n"


def write_fake_record(monkeypatch, workdir: Path, seed: int, estimator: str, **texts: str) -> str:
    """Call write_record as train_mdlm.main() does after training, on a made-up log of a finished run into workdir/record."""
    env = script_env(workdir, SEED=str(seed), RUN_ID=f"fake{seed}", RECORD_DIR="record", EVAL_METHOD=estimator, **texts)
    for name in set(os.environ) - set(env):
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(workdir)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no PNG of the made-up log
    lines = [
        f"train_batch_tokens:4096 seed:{seed}",
        f"final_int8_zlib_roundtrip val_loss:5.3245 val_bpb:3.1000 eval_time:5ms estimator:{estimator} kind:bound",
        "final_int8_zlib_roundtrip_exact val_loss:5.32446840 val_bpb:3.10000000",
        f"eval_method:{estimator} val_loss:5.32446840 val_bpb:3.10000000 stderr:0.01000000 passes_per_seq:8 eval_time:5ms",
        "Serialized model int8+zlib: 1000 bytes",
        f"Code size: {len(FAKE_CODE)} bytes",
        f"Total submission size int8+zlib: {1000 + len(FAKE_CODE)} bytes",
    ]
    (workdir / "logs").mkdir(exist_ok=True)
    (workdir / "logs" / f"fake{seed}.txt").write_text(FAKE_CODE + "\n" + SEPARATOR + "\n" + "\n".join(lines) + "\n")
    runtime = SimpleNamespace(device=torch.device("cpu"), world_size=1)
    return write_record(train_mdlm.Hyperparameters(), runtime, FAKE_CODE, steps=6)


def test_other_estimator_rejected_before_writing(monkeypatch, tmp_path):
    write_fake_record(monkeypatch, tmp_path, 1, "elbo")
    folder = tmp_path / "record"
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    with pytest.raises(ValueError, match="seed 2 was scored by estimator trap8, but the folder's other seeds by elbo"):
        write_fake_record(monkeypatch, tmp_path, 2, "trap8")
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    code = (folder / "train_mdlm.py").read_text()
    with pytest.raises(ValueError, match="seed 2 was scored by estimator trap8"):
        check_record_dir(str(folder), code, 2, "trap8")  # the same check, before training
    check_record_dir(str(folder), code, 2, "elbo")
    # A rerun of the only seed replaces its entry, so it may change the estimator.
    assert write_fake_record(monkeypatch, tmp_path, 1, "trap8").startswith("record:written dir:record seeds:1 ")
    assert json.loads((folder / "submission.json").read_text())["extras"]["estimator"] == "trap8"


def test_later_seed_keeps_stored_texts(monkeypatch, tmp_path):
    write_fake_record(monkeypatch, tmp_path, 1, "elbo")
    path = tmp_path / "record" / "submission.json"
    first = json.loads(path.read_text())
    assert first["name"] == "record"  # the folder's name when RECORD_NAME is empty
    assert first["author"] == ""
    texts = {"RECORD_AUTHOR": "Ada", "RECORD_GITHUB_ID": "ada", "RECORD_NAME": "Tiny", "RECORD_BLURB": "A blurb."}
    write_fake_record(monkeypatch, tmp_path, 2, "elbo", **texts)
    write_fake_record(monkeypatch, tmp_path, 3, "elbo")
    after_third_seed = json.loads(path.read_text())
    assert after_third_seed["author"] == "Ada"
    assert after_third_seed["github_id"] == "ada"
    assert after_third_seed["name"] == "Tiny"
    assert after_third_seed["blurb"] == "A blurb."
    write_fake_record(monkeypatch, tmp_path, 4, "elbo", RECORD_NAME="Renamed")
    renamed = json.loads(path.read_text())
    assert renamed["name"] == "Renamed"
    assert renamed["author"] == "Ada"
    assert renamed["extras"]["seeds"] == [1, 2, 3, 4]


def test_estimator_table_keeps_log_digits(monkeypatch, tmp_path):
    write_fake_record(monkeypatch, tmp_path, 1, "elbo")
    folder = tmp_path / "record"
    (method,) = json.loads((folder / "submission.json").read_text())["extras"]["runs"][0]["eval_methods"]
    assert method["passes_per_seq"] == 8
    assert isinstance(method["passes_per_seq"], int)
    assert method["val_loss"] == 5.3244684
    assert method["eval_time"] == "5ms"
    assert "| 1 | elbo | 5.32446840 | 3.10000000 | 0.01000000 |" in (folder / "README.md").read_text()


def test_parse_number_keeps_type():
    cases = [("8", 8, int), ("-3", -3, int), ("5.32446840", 5.3244684, float), ("1e-3", 0.001, float), ("1234ms", "1234ms", str)]
    for text, expected, expected_type in cases:
        assert parse_number(text) == expected, text
        assert type(parse_number(text)) is expected_type, text
