"""The tutorials: every notebook runs top to bottom, headless, and shows what its prose claims.

The notebooks are committed without outputs, so these runs are the only
source of truth for what they print.
"""

from __future__ import annotations

import re

import nbformat
import pytest
from nbclient import NotebookClient

from processes import ROOT

TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = ("1-basic-classifier.ipynb", "2-distributed.ipynb", "3-federated.ipynb")
CELL_TIMEOUT = 240  # seconds; a whole notebook takes about a minute on 2 cores


def execute(name: str) -> tuple[str, int]:
    """Runs the notebook in a fresh python3 kernel; returns all its text output, and how many pictures it showed."""
    notebook = nbformat.read(TUTORIALS / name, as_version=4)
    # Raises CellExecutionError, with the cell and its traceback, if a cell fails.
    NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                   resources={"metadata": {"path": str(TUTORIALS)}}).execute()
    texts, pictures = [], 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                texts.append(output.text)
            elif output.output_type in ("execute_result", "display_data"):
                texts.append(output.data.get("text/plain", ""))
                pictures += "image/png" in output.data
    return "\n".join(texts), pictures


def accuracy(pattern: str, text: str) -> list[float]:
    found = [float(value) for value in re.findall(pattern, text)]
    assert found, f"No line matched {pattern!r} in the notebook's output:\n{text[-3000:]}"
    return found


def test_the_three_tutorials_are_there():
    assert sorted(path.name for path in TUTORIALS.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("path", sorted(TUTORIALS.glob("*.ipynb")), ids=lambda path: path.name)
def test_committed_notebooks_have_no_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name} cell {index} holds outputs: clear all outputs before committing (CI executes the "
                f"notebooks; committed outputs would go stale)")


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    # The clusters' logs, models and pictures go here instead of tutorials/output.
    monkeypatch.setenv("TUTORIALS_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    return tmp_path


def test_basic_classifier_trains_on_one_machine(outputs):
    text, pictures = execute("1-basic-classifier.ipynb")
    assert pictures >= 4
    assert accuracy(r"Final test accuracy (\d\.\d+)", text)[-1] >= 0.85


def test_distributed_cluster_trains_and_stops(outputs):
    text, pictures = execute("2-distributed.ipynb")
    assert pictures >= 4  # bench/distributed.py's picture among them: this mode against one process
    assert accuracy(r"Final test accuracy (\d\.\d+)", text)[-1] >= 0.85
    assert re.search(r"500 rounds in [\d.]+ s", text)
    log = (outputs / "distributed" / "logs" / "ps.log").read_text()
    assert "The ps stopped at round 500." in log
    assert "Distributed mode: every round is one step of every worker, applied by fedadam" in log


def test_federated_model_beats_each_worker_alone_on_non_iid_data(outputs):
    text, pictures = execute("3-federated.ipynb")
    alone = accuracy(r"Worker \d alone: test accuracy (\d\.\d+)", text)
    federated = accuracy(r"Federated global model: test accuracy (\d\.\d+)", text)[-1]
    assert len(alone) == 2
    assert federated >= 0.85
    assert federated > max(alone) + 0.1, (federated, alone)
    assert "The ps stopped at round 30." in (outputs / "federated" / "logs" / "ps.log").read_text()
    # Each worker's accuracy on its own held-out examples, from the federated evaluation of round 27's model.
    workers = re.findall(r"Round 27's model on worker (\d)'s \d+ held-out examples: accuracy (\d\.\d+)", text)
    assert [task for task, _ in workers] == ["0", "1"]
    summary = re.search(r"Worst worker (\d\.\d+), best (\d\.\d+), all held-out examples (\d\.\d+)", text)
    worst, best, mean = map(float, summary.groups())
    assert (worst, best) == (min(float(a) for _, a in workers), max(float(a) for _, a in workers))
    assert worst <= mean <= best
    # The second run: the same shards with FedAdam on the ps, and both curves in one picture.
    assert pictures >= 6
    assert accuracy(r"FedAdam global model: test accuracy (\d\.\d+)", text)[-1] >= 0.85
    adam_log = (outputs / "fedadam" / "logs" / "ps.log").read_text()
    assert "Server optimizer fedadam with learning rate 0.1." in adam_log
    assert "The ps stopped at round 30." in adam_log
    assert re.search(r"FedAdam \(fedadam, learning rate 0\.1\): test accuracy 0\.90 first reached", text)
