"""Plot train loss and val_bpb of train_mdlm.py logs against step and against training time.

    python3 records/plot_logs.py logs/run_a.txt logs/run_b.txt --output curves.png

Each log is one line per panel, labelled by its seed, so several seeds overlay. The val_bpb panels
show the validation passes during training (VAL_LOSS_EVERY) as lines and the final roundtrip score
as a star at the last step. Needs matplotlib (pip install matplotlib). train_mdlm.py does not need it,
and with RECORD_DIR set it draws the record's PNG only when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from run_log import RunLog, parse_run


def run_label(run: RunLog, path: Path) -> str:
    return f"seed {run.seed}" if run.seed is not None else path.stem


def final_point(run: RunLog) -> tuple[float, float, float] | None:
    """Return the run's last step, training seconds and roundtrip val_bpb, or None when it has no final line or step line."""
    if not run.exact or not run.train:
        return None
    return run.train[-1].step, run.train_ms / 1000.0, float(run.exact["val_bpb"])


def draw_run(axes, run: RunLog, label: str, color) -> None:
    """Draw one run on the 2x2 axes: rows train loss and val_bpb, columns step and training seconds."""
    for column, x_of in enumerate((lambda point: point.step, lambda point: point.train_ms / 1000.0)):
        axes[0][column].plot([x_of(p) for p in run.train], [p.train_loss for p in run.train], color=color, label=label)
        if run.val:
            axes[1][column].plot([x_of(p) for p in run.val], [p.val_bpb for p in run.val], color=color, marker=".", label=label)
    final = final_point(run)
    if final is not None:
        step, seconds, val_bpb = final
        axes[1][0].plot([step], [val_bpb], color=color, marker="*", markersize=12, linestyle="none")
        axes[1][1].plot([seconds], [val_bpb], color=color, marker="*", markersize=12, linestyle="none")


def plot_logs(paths: list[Path], output: Path) -> None:
    """Write a PNG of every log's curves to output."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex="col")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, path in enumerate(paths):
        run = parse_run(Path(path).read_text(encoding="utf-8"))
        draw_run(axes, run, run_label(run, Path(path)), colors[i % len(colors)])
    axes[0][0].set_ylabel("train loss of the logged step (nats/token)")
    axes[1][0].set_ylabel("val_bpb (star: final roundtrip)")
    axes[1][0].set_xlabel("step")
    axes[1][1].set_xlabel("training time (s)")
    for row in axes:
        for ax in row:
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", type=Path, help="train_mdlm.py log files (logs/<RUN_ID>.txt or a record's train_seed*.log)")
    parser.add_argument("--output", "-o", type=Path, default=Path("loss_curves.png"), help="PNG file to write")
    options = parser.parse_args()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("error: plot_logs.py needs matplotlib: pip install matplotlib")
    plot_logs(options.logs, options.output)
    print(f"wrote {options.output}")


if __name__ == "__main__":
    main()
