"""Plot a CSV monitor directory: ``deepscale plot DIR [-o FILE]`` (also ``python -m deepscale.monitor.plot``).

Reads the ``csv_monitor`` files of one job (``output_path/job_name``) and writes one PNG with
a panel each for the loss, the learning rate and the throughput (samples/s, and tokens/s
when present), all against the step column (samples seen).
"""
import argparse
import csv
import os
import sys
from typing import Dict, List, Optional, Tuple

from deepscale.monitor import tags
from deepscale.monitor.base import require
from deepscale.monitor.csv_monitor import csv_file_name

PANELS = (("loss", (tags.TRAIN_LOSS,)), ("learning rate", (tags.LR,)),
          ("throughput", (tags.SAMPLES_PER_SEC, tags.TOKENS_PER_SEC)))


def read_csv_series(path: str) -> Tuple[List[float], List[float]]:
    """``(steps, values)`` of one CSV monitor file."""
    steps, values = [], []
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        next(reader, None)  # header
        for row in reader:
            if len(row) >= 2:
                steps.append(float(row[0]))
                values.append(float(row[1]))
    return steps, values


def load_series(csv_dir: str) -> Dict[str, Tuple[List[float], List[float]]]:
    """Every plotted tag that has a file in ``csv_dir``."""
    found = {}
    for _, panel_tags in PANELS:
        for tag in panel_tags:
            path = os.path.join(csv_dir, csv_file_name(tag))
            if os.path.exists(path):
                found[tag] = read_csv_series(path)
    return found


def plot_csv_dir(csv_dir: str, output: Optional[str] = None) -> str:
    """Write the PNG for ``csv_dir`` and return its path (default ``csv_dir/training_curves.png``)."""
    if not os.path.isdir(csv_dir):
        raise ValueError(f"deepscale plot: {csv_dir!r} is not a directory (pass csv_monitor.output_path/job_name)")
    series = load_series(csv_dir)
    if not series:
        raise ValueError(f"deepscale plot: no monitor CSV files in {csv_dir!r} (expected e.g. "
                         f"{csv_file_name(tags.TRAIN_LOSS)})")
    matplotlib = require("matplotlib", "matplotlib", "plot")
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 3 * len(PANELS)), sharex=True)
    for ax, (title, panel_tags) in zip(axes, PANELS):
        for tag in panel_tags:
            if tag in series:
                ax.plot(*series[tag], label=tag.rsplit("/", 1)[-1])
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(loc="best")
    axes[-1].set_xlabel("samples")
    fig.tight_layout()
    output = output or os.path.join(csv_dir, "training_curves.png")
    fig.savefig(output)
    plt.close(fig)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="deepscale plot", description=__doc__.splitlines()[0])
    parser.add_argument("csv_dir", help="the CSV monitor directory (csv_monitor.output_path/job_name)")
    parser.add_argument("-o", "--output", default=None, help="PNG file to write (default CSV_DIR/training_curves.png)")
    args = parser.parse_args(argv)
    try:
        print(plot_csv_dir(args.csv_dir, args.output))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
