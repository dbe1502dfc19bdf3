"""The committed gRPC code is exactly what the .proto generates."""

import os
import subprocess
import sys
from pathlib import Path

from processes import ROOT

GENERATED = ["comind_pb2.py", "comind_pb2.pyi", "comind_pb2_grpc.py"]


def test_committed_code_matches_proto(tmp_path: Path):
    subprocess.run([ROOT / "scripts" / "generate-proto", tmp_path], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHON": sys.executable})
    for name in GENERATED:
        fresh = (tmp_path / "comind" / "proto" / name).read_text()
        committed = (ROOT / "comind" / "proto" / name).read_text()
        assert committed == fresh, f"comind/proto/{name} is stale: run scripts/generate-proto and commit it"
