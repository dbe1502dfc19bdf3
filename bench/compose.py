"""The compose cluster's figures: image size, and seconds from `docker compose up` to the first round and to the end.

The image is built first (not timed); then, several times, a fresh compose
project of the real compose.yaml runs to the end, and the ps's log gives the
moment its first round closed.

    .venv/bin/python bench/compose.py [--repeats 3]

Writes its output to bench/results/compose.txt as well.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from compose_cluster import ROOT, Cluster, build_image, docker_or_skip

RESULTS = ROOT / "bench" / "results" / "compose.txt"


def first_round_time(ps_log: str) -> float:
    """Wall-clock time (UTC epoch) of the ps's first closed round."""
    for line in ps_log.splitlines():
        if "Round 1/" in line and "updates" in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.replace(tzinfo=datetime.UTC).timestamp()
    raise RuntimeError("the ps never closed a round")


def one_run(cluster: Cluster) -> tuple[float, float]:
    started = time.time()
    cluster.compose("up")
    ended = time.time()
    first = first_round_time(cluster.logs("ps"))
    cluster.down()
    return first - started, ended - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    client = docker_or_skip()
    base = build_image()
    image = client.images.get("comind:latest")
    runs = []
    with tempfile.TemporaryDirectory() as output:
        for repeat in range(args.repeats):
            runs.append(one_run(Cluster(client, base, Path(output) / str(repeat))))
            print(f"run {repeat + 1}: first round after {runs[-1][0]:.1f} s, done after {runs[-1][1]:.1f} s",
                  flush=True)
    text = "\n".join([
        f"bench/compose.py, {time.strftime('%Y-%m-%d %H:%M')}, base image {base}",
        f"image comind:latest: {image.attrs['Size'] / 1e9:.2f} GB",
        "docker compose up (image built) of compose.yaml: one ps, two workers, basic model, embedded digits",
        f"  to the first completed round: median {statistics.median(r[0] for r in runs):.1f} s",
        f"  to the end (all containers exited): median {statistics.median(r[1] for r in runs):.1f} s",
        f"  runs: {', '.join(f'{a:.1f}/{b:.1f}' for a, b in runs)}",
    ]) + "\n"
    print(text)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
