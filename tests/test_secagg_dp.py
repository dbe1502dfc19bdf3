"""Worker-level differential privacy under secure aggregation (distributed noise): each worker clips its update
and adds its noise share before masking; the ps divides the unmasked sum by the expected count and accounts for
the noise the survivors added. Rounds run in process through the worker's and the ps's own code, on the wire's
messages, without gRPC."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from comind import accountant
from comind.pipeline import PipelineSettings, RoundInProgress
from comind.privacy import DistributedNoise, DpFedAvg, DpSettings
from comind.proto import comind_pb2 as pb
from comind.secagg import wire
from comind.secagg.config import SecAggSettings
from comind.secagg.server import SecAggServer
from comind.secure_rounds import SecureSum
from comind.secure_worker import SecureExchange, SecureParameters
from comind.tensors import Layout

ROOT = Path(__file__).resolve().parent.parent
Z, CLIP, WORKERS = 1.0, 1.0, 3
SIZE = 4000
NOISE = DistributedNoise(Z, CLIP, WORKERS)
SECURE = SecAggSettings(clip_range=7.0, noise=NOISE)
LAYOUT = Layout.of([np.zeros((SIZE // 2, 2), np.float32)])
#: Every worker's update: norm 2, so that each clips it to C = 1 (1 / sqrt(SIZE) in every value).
UPDATE = LAYOUT.pack([np.full((SIZE // 2, 2), 2 / math.sqrt(SIZE), np.float32)])


def secure_round(round: int, privacy: DpFedAvg, survivors: int = WORKERS) -> np.ndarray:
    """One round among WORKERS workers, the last ``WORKERS - survivors`` dropping out before their masked input:
    the aggregate the ps's pipeline releases."""
    sent: dict[int, list[pb.WorkerMessage]] = {p: [] for p in range(WORKERS)}
    exchanges = {p: SecureExchange(p, round, LAYOUT, UPDATE, SecureParameters.of(join_reply()), sent[p].append)
                 for p in range(WORKERS)}
    server = SecAggServer(round, None, SECURE, SIZE)
    for p, exchange in exchanges.items():
        server.advertise(wire.advertisement(round, p, exchange.keys))
    roster = wire.roster_to_proto(server.close_advertising())
    for p, exchange in exchanges.items():
        list(exchange.answer(iter([pb.PsMessage(secagg_roster=roster)])))
        server.share(p, wire.shares(sent[p].pop().secagg_shares))
    inboxes = server.close_sharing()
    for p in range(survivors):
        list(exchanges[p].answer(iter([pb.PsMessage(secagg_inbox=wire.shares_to_proto(inboxes[p]))])))
        data = b"".join(m.data for m in sent[p] if not m.end)
        server.masked_input(p, round, np.frombuffer(data, np.uint32))
        sent[p].clear()
    request = wire.unmask_to_proto(server.close_masking())
    for p in range(survivors):
        list(exchanges[p].answer(iter([pb.PsMessage(secagg_unmask=request)])))
        server.unmask(wire.reveal(p, sent[p].pop().secagg_reveal))
    total, count = server.finish()
    in_progress = RoundInProgress(SecureSum(LAYOUT, total, count, WORKERS, SECURE), None, privacy)
    return LAYOUT.views(in_progress.result(1.0))[0].reshape(-1).astype(np.float64)


def join_reply() -> pb.JoinReply:
    """What the ps's JoinReply carries (``service.py``'s fields)."""
    reply = pb.JoinReply()
    reply.secure_aggregation.clip_range = SECURE.clip_range
    reply.secure_aggregation.noise.CopyFrom(pb.SecAggNoise(clip=CLIP, noise_multiplier=Z, expected_updates=WORKERS))
    return reply


def dp_fedavg() -> DpFedAvg:
    return DpFedAvg(DpSettings(noise_multiplier=Z, clip=CLIP, expected_updates=WORKERS))


def test_the_aggregates_noise_has_std_z_c_over_m_and_each_round_is_in_the_ledger():
    """The sum of three shares over the fixed denominator m = 3: mean C / sqrt(SIZE) per value, std z C / m."""
    privacy = dp_fedavg()
    rounds = [secure_round(r, privacy) for r in range(1, 6)]
    noise = np.concatenate(rounds) - CLIP / math.sqrt(SIZE)
    assert abs(noise.mean()) < 4 * Z * CLIP / WORKERS / math.sqrt(noise.size)
    assert noise.std() == pytest.approx(Z * CLIP / WORKERS, rel=0.03)
    assert privacy.ledger.events == {(1.0, Z): 5}
    assert privacy.ledger.epsilon > 0


def test_a_round_with_a_dropout_is_accounted_with_the_noise_its_survivors_added():
    """Two of three survivors: their clipped sum and their two noise shares (std z C sqrt(2 / 3)) over m = 3; the
    ledger's z is z sqrt(2 / 3)."""
    privacy = dp_fedavg()
    aggregate = secure_round(1, privacy, survivors=2)
    noise = aggregate - 2 * CLIP / math.sqrt(SIZE) / WORKERS
    assert noise.std() == pytest.approx(Z * CLIP * math.sqrt(2 / 3) / WORKERS, rel=0.06)
    [((q, z), rounds)] = privacy.ledger.events.items()
    assert (q, rounds) == (1.0, 1) and z == pytest.approx(Z * math.sqrt(2 / 3))


def test_the_settings_refuse_adaptive_clipping_and_a_range_too_small_for_the_noise():
    def settings(privacy: DpSettings, secure: SecAggSettings) -> PipelineSettings:
        return PipelineSettings(weighting="uniform", privacy=privacy, secure_aggregation=secure)

    fixed = DpSettings(noise_multiplier=Z, clip=CLIP, expected_updates=WORKERS)
    settings(fixed, SECURE)  # C + 10 z C / sqrt(3) = 6.77: within 7
    with pytest.raises(ValueError, match=r"set it to at least 6\.78"):
        settings(fixed, SecAggSettings(clip_range=6.5, noise=NOISE))
    with pytest.raises(ValueError, match="Adaptive clipping follows the norms"):
        settings(DpSettings(noise_multiplier=Z, clip=None, expected_updates=30), SECURE)
    with pytest.raises(ValueError, match="must carry the DP stage's clip"):
        settings(fixed, SecAggSettings(clip_range=7.0))


@pytest.mark.parametrize("flags, says", [
    (["--dp-clip", "adaptive"], "Adaptive clipping follows the norms"),
    (["--dp-clip", "1", "--secagg-clip-range", "4"], "COMIND_SECAGG_CLIP_RANGE must hold C plus 10"),
    (["--dp-clip", "1", "--secagg-clip-range", "7", "--client-fraction", "0.5"], "has no answer for those rounds"),
])
def test_the_ps_refuses_them_at_start(flags, says):
    result = subprocess.run([sys.executable, "-m", "comind", "ps", "--secure-aggregation", "--num-workers", "3",
                             "--dp-noise-multiplier", "1", *flags], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_comind_local_trains_with_distributed_noise_and_logs_epsilon(tmp_path):
    env = {**os.environ, "COMIND_METRICS_PORT": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-m", "comind", "local", "--workers", "3", "--rounds", "2",
                             "--interval-steps", "5", "--output-dir", str(tmp_path), "--secure-aggregation",
                             "--dp-noise-multiplier", "1", "--dp-clip", "0.5", "--secagg-clip-range", "4"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    # Two rounds of every worker (q = 1) at z = 1, by the ps's ledger: its epsilon, in the log line and the metrics.
    expected = [accountant.compose({(1.0, Z): rounds}, 1e-5) for rounds in (1, 2)]
    for round, epsilon in enumerate(expected, 1):
        assert re.search(rf"Round {round}/2: 3 updates, .* epsilon {epsilon:.4g} at delta 1e-05", result.stdout)
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert [r["epsilon"] for r in rounds] == pytest.approx(expected)
    assert "adds its share of the noise (std 0.2887)" in (tmp_path / "logs" / "ps.log").read_text()
