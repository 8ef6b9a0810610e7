"""Parse the log that train_mdlm.py writes to logs/<RUN_ID>.txt.

A log file contains the script's source, a separator line of 100 "=", then one line per event, mostly
space-separated key:value pairs. A RUN_ID that is reused appends a second run to the same file, so
every reader here looks at the last run only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

SEPARATOR = "=" * 100


def last_run_text(text: str, code: str | None = None) -> str:
    """Return the part of a log file that belongs to its last run, from that run's copy of the source on.

    With the script's source as code, the run starts where that source starts. Without it, the
    text from the last separator line on is returned, which leaves the source out.
    """
    if code is not None:
        start = text.rfind(code + "\n" + SEPARATOR + "\n")
        if start < 0:
            raise ValueError(
                f"the log contains no run of this script (its source followed by a line of {len(SEPARATOR)} '='): "
                "pass the log file that this script wrote"
            )
        return text[start:]
    start = text.rfind("\n" + SEPARATOR + "\n")
    if start < 0:
        raise ValueError(f"the log has no line of {len(SEPARATOR)} '=' after the script's source: pass a log file that train_mdlm.py wrote")
    return text[start + 1 :]


def event_lines(text: str) -> list[str]:
    """Return the lines the last run logged after its source and separator."""
    run = last_run_text(text)
    return run.split("\n")[1:]


def parse_fields(text: str) -> dict[str, str]:
    """Split a line into its key:value pairs, skipping words without a colon."""
    return dict(word.split(":", 1) for word in text.split() if ":" in word)


def milliseconds(value: str) -> float:
    """Parse a duration as the log writes it, such as 180322ms."""
    return float(value.removesuffix("ms"))


def parse_number(value: str) -> int | float | str:
    """Parse a field value as an int (such as 8) or a float (such as 5.32446840). Return other text (such as 1234ms) unchanged."""
    for number_type in (int, float):
        try:
            return number_type(value)
        except ValueError:
            pass
    return value


def parse_size_line(line: str) -> tuple[str, int] | None:
    """Parse a size line such as "Code size: 56540 bytes" into its label and byte count. Return None for other lines."""
    label, separator, value = line.partition(": ")
    if not separator or not value.endswith(" bytes"):
        return None
    try:
        return label, int(value.removesuffix(" bytes"))
    except ValueError:
        return None


def parse_sample_line(line: str) -> dict:
    """Parse a sample line: key:value fields, then text: with a JSON string that may contain spaces."""
    head, _, text = line.partition(" text:")
    sample = {key: int(value) for key, value in parse_fields(head).items()}
    sample["text"] = json.loads(text)
    return sample


@dataclass
class TrainPoint:
    step: int
    train_ms: float
    train_loss: float


@dataclass
class ValPoint:
    step: int
    train_ms: float
    val_loss: float
    val_bpb: float


@dataclass
class RunLog:
    """Events of one run, with numbers as the log printed them."""

    seed: int | None = None
    train: list[TrainPoint] = field(default_factory=list)
    val: list[ValPoint] = field(default_factory=list)
    final: dict[str, str] = field(default_factory=dict)  # final_int8_*_roundtrip line
    exact: dict[str, str] = field(default_factory=dict)  # final_int8_*_roundtrip_exact line
    sizes: dict[str, int] = field(default_factory=dict)  # label of each size line -> bytes
    eval_methods: list[dict[str, int | float | str]] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    stop_ms: float | None = None  # train_time of the stopping_early line, when the wallclock cap ended training

    @property
    def train_ms(self) -> float | None:
        """Training time in ms, evaluation excluded: the stop line's, else the last step line's."""
        if self.stop_ms is not None:
            return self.stop_ms
        return self.train[-1].train_ms if self.train else None

    def size(self, label_start: str) -> int | None:
        """Return the bytes of the first size line whose label starts with label_start, or None when there is none."""
        return next((size for label, size in self.sizes.items() if label.startswith(label_start)), None)


def parse_step_line(fields: dict[str, str], run: RunLog) -> None:
    step = int(fields["step"].split("/")[0])
    if "train_loss" in fields:
        run.train.append(TrainPoint(step, milliseconds(fields["train_time"]), float(fields["train_loss"])))
    elif "val_bpb" in fields:
        run.val.append(ValPoint(step, milliseconds(fields["train_time"]), float(fields["val_loss"]), float(fields["val_bpb"])))


def parse_run(text: str) -> RunLog:
    """Parse the last run of a log file's text."""
    run = RunLog()
    for line in event_lines(text):
        name = line.split(" ", 1)[0]
        fields = parse_fields(line)
        if name.startswith("final_int8_") and name.endswith("_roundtrip"):
            run.final = fields
        elif name.startswith("final_int8_") and name.endswith("_roundtrip_exact"):
            run.exact = fields
        elif name.startswith("sample:"):
            run.samples.append(parse_sample_line(line))
        elif name.startswith("eval_method:"):
            run.eval_methods.append({key: parse_number(value) for key, value in fields.items()})
        elif name.startswith("step:"):
            parse_step_line(fields, run)
        elif name.startswith("stopping_early:"):
            run.stop_ms = milliseconds(fields["train_time"])
        elif "seed" in fields and run.seed is None:
            run.seed = int(fields["seed"])
        elif (size := parse_size_line(line)) is not None:
            run.sizes[size[0]] = size[1]
    return run
