"""Accuracy and bytes of each update encoding: `comind local --workers 2` on the embedded digits.

Trains the basic model on the digits (the preset: 15 rounds of 100 local
steps) once per encoding, the same seed each time, and prints the final test
accuracy next to float32's, with the bytes of one update up and of the model
down (from the model's layout: every encoding's size follows from it).

    .venv/bin/python bench/encodings.py [--repeats 1]

Writes its output to bench/results/encodings.txt as well.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from comind import encodings  # noqa: E402
from comind.tensors import Layout  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "encodings.txt"
#: (update encoding, model encoding)
RUNS = [("float32", "float32"), ("float16", "float32"), ("bfloat16", "float32"), ("int8", "float32"),
        ("topk:0.1", "float32"), ("topk:0.01", "float32"), ("float32", "float16"), ("int8", "float16")]
#: The basic model on the digits: Dense 64 -> 128 -> 10.
DIGITS_MODEL = Layout.of([np.zeros((64, 128), np.float32), np.zeros(128, np.float32),
                          np.zeros((128, 10), np.float32), np.zeros(10, np.float32)])


def accuracy(update: str, model: str, output: Path) -> float:
    env = {**os.environ, "COMIND_METRICS_PORT": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-m", "comind", "local", "--workers", "2", "--update-encoding", update,
                             "--model-encoding", model, "--output-dir", str(output)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"comind local --update-encoding {update} failed:\n{result.stderr[-3000:]}")
    return float(json.loads((output / "metrics.json").read_text())["final"]["eval_accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each encoding, their accuracy averaged")
    repeats = parser.parse_args().repeats
    lines = [f"# bench/encodings.py --repeats {repeats}: {platform.machine()}, {os.cpu_count()} CPUs, "
             f"Python {platform.python_version()}",
             f"{'update':>10} {'model':>8} {'up bytes':>9} {'ratio':>7} {'down bytes':>10} {'accuracy':>9} "
             f"{'vs float32':>10}"]
    print("\n".join(lines), flush=True)
    reference = None
    figures = []
    with tempfile.TemporaryDirectory() as scratch:
        for i, (update, model) in enumerate(RUNS):
            runs = [accuracy(update, model, Path(scratch) / f"{i}-{r}") for r in range(repeats)]
            mean = statistics.fmean(runs)
            reference = mean if reference is None else reference
            up = encodings.parse(update).wire_layout(DIGITS_MODEL).nbytes
            down = encodings.parse(model).wire_layout(DIGITS_MODEL).nbytes
            line = (f"{update:>10} {model:>8} {up:>9} {up / DIGITS_MODEL.nbytes:>7.4f} {down:>10} {mean:>9.4f} "
                    f"{100 * (mean - reference):>+9.2f}pt")
            print(line, flush=True)
            lines.append(line)
            figures.append({"update_encoding": update, "model_encoding": model, "update_bytes": up,
                            "model_bytes": down, "accuracy": mean, "runs": runs})
    lines.append(json.dumps({"model_bytes_float32": DIGITS_MODEL.nbytes, "runs": figures}))
    print(lines[-1])
    RESULTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
