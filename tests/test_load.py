"""Load: a few hundred workers, each with its own connection, against one real ps.

A CI-sized run of ``bench/load.py`` (which has the 1,000-worker figures):
every worker must get every round, the ps must accept every update and
refuse none as stale, and its memory must stay flat in the number of
workers.
"""

from __future__ import annotations

import sys

import pytest

from comind.metrics import UPDATE_RESULTS
from processes import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from core import MB, render
from load import Scenario, run_load, section

SCENARIO = Scenario("250 workers x 0.4 MB", clients=250, model_bytes=400_000, warmup_rounds=1, measured_rounds=4,
                    processes=2)
#: Each worker's update may sit in the ps's receive window at once (0.4 MB
#: each, 100 MB in all), plus about 100 MB for an idle ps holding the model;
#: a ps that held megabytes per connection, or a model per waiting pull,
#: would pass 500 MB.
MAX_PS_PEAK_BYTES = 400 * MB
#: Far above a round's second or so on 2 busy cores: this catches a hang or
#: work quadratic in the workers, not a slow machine.
MAX_ROUND_SECONDS = 20.0


@pytest.mark.timeout(180)
def test_250_workers_get_every_round_with_no_update_refused():
    run = run_load(SCENARIO)
    print("\n".join(render(section(run))))
    assert not run.errors, run.errors[:5]
    assert run.rounds_seen == set(range(1, SCENARIO.rounds + 1))
    assert run.updates == {**dict.fromkeys(UPDATE_RESULTS, 0), "accepted": SCENARIO.clients * SCENARIO.rounds}
    assert run.ps_exit_status == 0
    assert run.ps_peak_bytes <= MAX_PS_PEAK_BYTES
    assert run.round_seconds.max() <= MAX_ROUND_SECONDS
