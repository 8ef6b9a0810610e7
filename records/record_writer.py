"""Write a challenge record folder at the end of a train_mdlm.py run.

train_mdlm.py imports this module when RECORD_DIR is set. It calls check_record_dir before training
and write_record on rank 0 after the final score. The folder gets the challenge's layout:

    train_mdlm.py           the exact script that ran
    train_seed<SEED>.log    the run's full log (one per seed)
    submission.json         the challenge's fields, then our own under "extras"
    README.md               results table, loss curves, samples and the commands that ran
    loss_curves.png         train loss and val_bpb curves, when matplotlib is installed

Every number comes from the run's own log (logs/<RUN_ID>.txt), except the facts that the script
hands over (seed, steps, hardware, command). Runs with other seeds into the same folder merge. The
challenge's val_loss and val_bpb become the mean over seeds, and extras keep each seed's results
with the sample standard deviation. All seeds of a folder must share the estimator (the first
EVAL_METHOD), and a run without a RECORD_* text keeps the one an earlier seed stored.

NOTE: nothing locks submission.json. Two runs that finish at the same moment into one folder can
lose one seed's entry, so run the seeds of one folder one after another.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import statistics
from datetime import datetime, timezone
from pathlib import Path

from run_log import RunLog, last_run_text, parse_run

SCRIPT_NAME = "train_mdlm.py"
SUBMISSION_NAME = "submission.json"
PNG_NAME = "loss_curves.png"
README_NAME = "README.md"
# Field names of the challenge's submission.json, in its order.
CHALLENGE_FIELDS = ("author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb", "bytes_total", "bytes_code")
# The text fields of submission.json, each with the Hyperparameters attribute and the env var that sets it.
TEXT_SETTINGS = {
    "author": ("record_author", "RECORD_AUTHOR"),
    "github_id": ("record_github_id", "RECORD_GITHUB_ID"),
    "name": ("record_name", "RECORD_NAME"),
    "blurb": ("record_blurb", "RECORD_BLURB"),
}
NEW_FOLDER_HINT = "choose a new RECORD_DIR such as records/track_non_record_16mb/<date>_<name>"


def check_record_dir(record_dir: str, code: str, seed: int | None = None, estimator: str | None = None) -> None:
    """Check that record_dir can take a run of this script, and raise ValueError if it cannot. Create nothing.

    A folder keeps the runs of one script, so an existing copy of another script is an error. A
    README.md without a submission.json beside it belongs to something else, such as the repository
    root, and write_record would overwrite it. Given the run's seed and estimator (the first EVAL_METHOD),
    a run that the folder's other seeds cannot be averaged with is rejected too, before it trains.
    """
    folder = Path(record_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder: set RECORD_DIR to a folder path")
    readme = folder / README_NAME
    if readme.exists() and not (folder / SUBMISSION_NAME).exists():
        raise ValueError(
            f"{readme.resolve()} exists without a {SUBMISSION_NAME} beside it, so the folder is not a record folder "
            f"and writing a record would overwrite that README: {NEW_FOLDER_HINT}"
        )
    script = folder / SCRIPT_NAME
    if script.exists() and script.read_text(encoding="utf-8") != code:
        raise ValueError(f"{script} is a different script, and the runs of one folder must share one script: {NEW_FOLDER_HINT}")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        raise ValueError(f"{existing.resolve()} is not writable: make it writable or choose another RECORD_DIR")
    stored_runs = load_submission(folder).get("extras", {}).get("runs", [])
    if estimator is not None:
        check_estimator(stored_runs, {"seed": seed, "estimator": estimator})


def load_submission(folder: Path) -> dict:
    """Read the folder's submission.json and check that it lists per-seed runs. Return {} when there is none yet."""
    path = folder / SUBMISSION_NAME
    if not path.exists():
        return {}
    try:
        submission = json.loads(path.read_text(encoding="utf-8"))
        submission["extras"]["runs"] = list(submission["extras"]["runs"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path} is not a submission.json written by records/record_writer.py, because reading it failed with {error!r}: "
            f"move it away or {NEW_FOLDER_HINT}"
        ) from None
    return submission


def cpu_name() -> str:
    """Return the CPU model from /proc/cpuinfo on Linux, else what the platform module reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_hardware(runtime) -> str:
    """Describe the processes and devices of the run, such as "8x NVIDIA H100 80GB HBM3"."""
    import torch

    if runtime.device.type == "cuda":
        return f"{runtime.world_size}x {torch.cuda.get_device_name(runtime.device)}"
    return f"{runtime.world_size}x CPU process ({cpu_name()}, torch threads: {torch.get_num_threads()}, logical cores: {os.cpu_count()})"


class ReadRecorder(dict):
    """A copy of the environment that records the names read through get()."""

    def __init__(self, env):
        super().__init__(env)
        self.names: list[str] = []

    def get(self, key, default=None):
        self.names.append(key)
        return super().get(key, default)


def run_command(hyperparameters_class, runtime, env=os.environ) -> str:
    """Build the shell command that reruns this run: every setting it read from a non-empty env var, then the launcher.

    The settings are found by building the Hyperparameters again from a recording copy of env.
    """
    recorder = ReadRecorder(env)
    hyperparameters_class(recorder)
    names = [name for name in dict.fromkeys(recorder.names) if env.get(name, "").strip()]
    settings = [f"{name}={shlex.quote(env[name])}" for name in names]
    if runtime.world_size == 1:
        launcher = f"python3 {SCRIPT_NAME}"
    else:
        # NOTE: a multi-node command lacks the rendezvous options (--rdzv-endpoint …), which this process does not know.
        per_node = int(env.get("LOCAL_WORLD_SIZE", runtime.world_size))
        nodes = runtime.world_size // per_node
        node_options = f"--nnodes={nodes} " if nodes > 1 else "--standalone "
        launcher = f"torchrun {node_options}--nproc_per_node={per_node} {SCRIPT_NAME}"
    return " ".join(settings + [launcher])


def seed_entry(run: RunLog, seed: int, steps: int, hardware: str, command: str, log_name: str, date: str) -> dict:
    """Collect one seed's results: the score and sizes from its log, and the facts the script handed over."""
    if not run.exact or run.size("Code size") is None or run.size("Total submission size") is None:
        raise ValueError(
            f"the log of seed {seed} lacks the final_int8_*_roundtrip_exact line or the size lines, so it is not the log of a "
            "finished run: check that logs/<RUN_ID>.txt was not changed during the run, then rerun"
        )
    return {
        "seed": seed,
        "val_loss": float(run.exact["val_loss"]),
        "val_bpb": float(run.exact["val_bpb"]),
        "bytes_total": run.size("Total submission size"),
        "bytes_code": run.size("Code size"),
        "bytes_model": run.size("Serialized model"),
        "estimator": run.final.get("estimator"),
        "steps": steps,
        "train_time_ms": run.train_ms,
        "hardware": hardware,
        "eval_methods": run.eval_methods,
        "command": command,
        "log": log_name,
        "date": date,
    }


def check_estimator(runs: list[dict], entry: dict) -> None:
    """Raise ValueError unless the other seeds in runs were scored by the estimator of entry.

    The record's val_loss and val_bpb are means over seeds, so they must all come from one estimator.
    """
    others = sorted({str(run["estimator"]) for run in runs if run["seed"] != entry["seed"]})
    if others and others != [str(entry["estimator"])]:
        raise ValueError(
            f"seed {entry['seed']} was scored by estimator {entry['estimator']}, but the folder's other seeds by "
            f"{', '.join(others)}, and the record averages val_bpb over seeds. Nothing was written to RECORD_DIR: rerun "
            f"with EVAL_METHOD set as in those runs (its first method is the estimator), or {NEW_FOLDER_HINT}"
        )


def record_texts(args, stored: dict, env=os.environ) -> dict[str, str]:
    """Return author, github_id, name and blurb: this run's where its env var is set, else the folder's stored ones.

    So a later seed run without the RECORD_* texts keeps those of the earlier runs. When RECORD_NAME is
    empty and nothing is stored, the name is args.record_name, which train_mdlm.py sets to the folder's name.
    """
    texts = {}
    for field, (attribute, variable) in TEXT_SETTINGS.items():
        value = getattr(args, attribute)
        texts[field] = value if env.get(variable, "").strip() else stored.get(field) or value
    return texts


def merge_runs(runs: list[dict], entry: dict) -> list[dict]:
    """Add entry to runs, replacing an earlier run of the same seed, and sort them by seed."""
    other_seeds = [run for run in runs if run["seed"] != entry["seed"]]
    return sorted(other_seeds + [entry], key=lambda run: run["seed"])


def mean_and_std(values: list[float]) -> tuple[float, float | None]:
    """Return the mean and sample standard deviation (n − 1 in the denominator). The deviation is None for one value."""
    std = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), std


def build_submission(runs: list[dict], texts: dict[str, str], date: str) -> dict:
    """Build submission.json: the challenge's fields over all seeds, then our own under "extras".

    val_loss and val_bpb are the means over seeds; bytes_total is the largest artifact plus code,
    because every seed's artifact must fit the limit.
    """
    val_loss, val_loss_std = mean_and_std([run["val_loss"] for run in runs])
    val_bpb, val_bpb_std = mean_and_std([run["val_bpb"] for run in runs])
    estimators = sorted({str(run["estimator"]) for run in runs})
    values = dict(
        texts,
        date=date,
        val_loss=round(val_loss, 8),
        val_bpb=round(val_bpb, 8),
        bytes_total=max(run["bytes_total"] for run in runs),
        bytes_code=max(run["bytes_code"] for run in runs),
    )
    submission = {name: values[name] for name in CHALLENGE_FIELDS}
    submission["extras"] = {
        "estimator": ",".join(estimators),
        "seeds": [run["seed"] for run in runs],
        "val_loss_std": None if val_loss_std is None else round(val_loss_std, 8),
        "val_bpb_std": None if val_bpb_std is None else round(val_bpb_std, 8),
        "runs": runs,
    }
    return submission


def fenced(text: str, language: str = "") -> str:
    """Wrap text in a Markdown code block whose fence is longer than any run of backticks in text."""
    max_backtick_run = max(map(len, re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, max_backtick_run + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def format_number(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def results_table(submission: dict) -> list[str]:
    """Format the results as a Markdown table: one row per seed, the mean (largest size), the sample standard deviation."""
    extras = submission["extras"]
    lines = [
        "| seed | steps | train time (s) | val_loss | val_bpb | bytes_total | bytes_code | hardware |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for run in extras["runs"]:
        train_s = None if run["train_time_ms"] is None else run["train_time_ms"] / 1000.0
        lines.append(
            f"| {run['seed']} | {run['steps']} | {format_number(train_s, 1)} | {run['val_loss']:.8f} | {run['val_bpb']:.8f} "
            f"| {run['bytes_total']} | {run['bytes_code']} | {run['hardware']} |"
        )
    lines.append(
        f"| **mean** | | | {submission['val_loss']:.8f} | {submission['val_bpb']:.8f} | {submission['bytes_total']} (max) "
        f"| {submission['bytes_code']} | |"
    )
    lines.append(
        f"| **sample std** | | | {format_number(extras['val_loss_std'], 8)} | {format_number(extras['val_bpb_std'], 8)} | | | |"
    )
    return lines


def eval_methods_table(runs: list[dict]) -> list[str]:
    """Format the eval_method lines as a Markdown table, one row per seed and method. Return [] when the logs have none."""
    rows = [(run["seed"], method) for run in runs for method in run["eval_methods"]]
    if not rows:
        return []
    lines = ["| seed | method | val_loss | val_bpb | stderr |", "| ---: | --- | ---: | ---: | ---: |"]
    for seed, method in rows:
        numbers = [format_number(method.get(key), 8) for key in ("val_loss", "val_bpb", "stderr")]
        lines.append(f"| {seed} | {method.get('eval_method')} | {' | '.join(numbers)} |")
    return lines


def sample_sections(folder: Path, runs: list[dict]) -> list[str]:
    """Format the samples of each seed, read back from its log in the folder."""
    lines = []
    for run in runs:
        samples = parse_run((folder / run["log"]).read_text(encoding="utf-8")).samples
        for sample in samples:
            kind = "unconditional" if sample["prompt_tokens"] == 0 else f"after a {sample['prompt_tokens']}-token prompt (BOS included)"
            lines.append(
                f"Seed {run['seed']}, sample {sample['sample']}: {kind}, {sample['tokens']} tokens, "
                f"{sample['forward_passes']} forward passes."
            )
            lines += ["", fenced(sample["text"], "text"), ""]
    return lines


def results_section(submission: dict) -> list[str]:
    """Format the Results section: what the numbers mean, the table, and any eval_method lines."""
    lines = [
        "## Results",
        "",
        f"Score of the int8 artifact read back from disk (the log's `final_int8_*_roundtrip_exact` line), "
        f"estimator `{submission['extras']['estimator']}`. `val_loss` is in nats per token, `val_bpb` in bits per byte. "
        "Train time is the training time the log reports, evaluation excluded.",
        "",
        *results_table(submission),
        "",
    ]
    methods = eval_methods_table(submission["extras"]["runs"])
    if methods:
        lines += ["Every estimator the runs logged:", "", *methods, ""]
    return lines


def build_readme(folder: Path, submission: dict, png_written: bool) -> str:
    """Compose the record's README: title, author, results, loss curves, samples and each seed's command."""
    runs = submission["extras"]["runs"]
    lines = [f"# {submission['name']}", ""]
    if submission["blurb"]:
        lines += [submission["blurb"], ""]
    author = submission["author"] or "not set"
    github_id = submission["github_id"] or "not set"
    lines += [f"Author: {author}. GitHub: {github_id}. Written by records/record_writer.py on {submission['date']}.", ""]

    lines += results_section(submission)
    if png_written:
        lines += ["## Loss curves", "", f"![train loss and val_bpb against step and training time]({PNG_NAME})", ""]

    samples = sample_sections(folder, runs)
    if samples:
        lines += [
            "## Samples",
            "",
            "Drawn from the roundtrip model with the MDLM ancestral sampler (see `SAMPLE_*` in the commands). "
            "Seeds that share `SAMPLE_SEED` share the sampler's random draws, so their samples can look alike.",
            "",
        ]
        lines += samples

    lines += ["## Commands", "", "Each seed's run, from the repository root:", ""]
    for run in runs:
        lines += [f"Seed {run['seed']} (`{run['log']}`):", "", fenced(run["command"], "bash"), ""]
    return "\n".join(lines).rstrip() + "\n"


def render_curves(folder: Path, runs: list[dict]) -> bool:
    """Draw loss_curves.png from every seed's log and return True. Return False and draw nothing when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    import plot_logs

    plot_logs.plot_logs([folder / run["log"] for run in runs], folder / PNG_NAME)
    return True


def write_record(args, runtime, code: str, steps: int) -> str:
    """Write or update the record folder RECORD_DIR with this run, and return a key:value line for the log.

    args is the run's Hyperparameters and runtime its Runtime. The log is read from logs/<RUN_ID>.txt,
    the path train_mdlm.py writes it to. The RECORD_* texts and command come from os.environ.
    """
    folder = Path(args.record_dir)
    log_text = last_run_text((Path("logs") / f"{args.run_id}.txt").read_text(encoding="utf-8"), code)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    log_name = f"train_seed{args.seed}.log"
    entry = seed_entry(
        parse_run(log_text), args.seed, steps, describe_hardware(runtime), run_command(type(args), runtime), log_name, date
    )
    stored = load_submission(folder)
    stored_runs = stored["extras"]["runs"] if stored else []
    check_estimator(stored_runs, entry)  # before anything is written
    runs = merge_runs(stored_runs, entry)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SCRIPT_NAME).write_text(code, encoding="utf-8")
    (folder / log_name).write_text(log_text, encoding="utf-8")
    submission = build_submission(runs, record_texts(args, stored), date)
    (folder / SUBMISSION_NAME).write_text(json.dumps(submission, indent=2) + "\n", encoding="utf-8")
    png_written = render_curves(folder, runs)
    (folder / README_NAME).write_text(build_readme(folder, submission, png_written), encoding="utf-8")
    std = submission["extras"]["val_bpb_std"]
    return (
        f"record:written dir:{folder} seeds:{len(runs)} val_bpb_mean:{submission['val_bpb']:.8f} "
        f"val_bpb_std:{'n/a' if std is None else f'{std:.8f}'} png:{'written' if png_written else 'skipped_no_matplotlib'}"
    )
