"""Prometheus series of the ps and the workers (docs/design.md, decision 8).

Each class takes the registry to register in, so tests build a fresh
``CollectorRegistry`` and read values with ``get_sample_value``.
"""

from __future__ import annotations

import logging
import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from comind.federated_eval import STATISTICS, Evaluation

log = logging.getLogger(__name__)

#: Rounds last from milliseconds (a small model on loopback) to many minutes
#: (a CNN on CPUs); the default buckets are sized for web requests.
ROUND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

#: A durable checkpoint write (savez, fsync, rename, fsync of the directory) took, on a 2-core VM's disk, 1 to 3 ms
#: for models up to 0.4 MB, 6 ms for 4 MB and 55 ms for 40 MB; a 4 GB model on a network volume takes many
#: seconds. In ROUND_BUCKETS, every small model's write fell in the lowest bucket.
CHECKPOINT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                      10, 30, 60)

#: ``comind_updates_total`` labels: what became of each update. ``early`` is an update for a round the ps has
#: not reached (it resumed from an older checkpoint); ``busy`` one the ps had no room to receive in time.
UPDATE_RESULTS = ("accepted", "duplicate", "stale", "early", "not_selected", "rejected", "busy")

#: Asynchronous rounds' staleness, in versions: most updates are a few versions old; the default --max-staleness
#: is 10.
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 5, 7, 10, 15, 20, 30, 50, 100)

#: ``comind_round_workers`` labels, of the last round that closed: the live workers it drew from, those it
#: selected (every live worker without client sampling), those whose update it aggregated, and those selected
#: that it closed without (gone, slow, or beyond its quorum). With asynchronous rounds and client sampling: the
#: workers training when the version closed (at most K), and the turns that ended during it without an update.
ROUND_WORKERS = ("population", "selected", "reported", "dropped")

#: ``comind_joins_refused_total`` labels: registrations faster than the ps takes them, for a task index a live
#: member of another process holds, or beyond the ps's most members.
JOIN_REFUSALS = ("rate", "taken", "full")

#: ``comind_federated_eval_reports_total`` labels: workers' tests of the global model taken with their update, or
#: refused with it (not finite, out of range, or of a round the ps did not ask for).
FEDERATED_EVAL_RESULTS = ("accepted", "rejected")
#: ``comind_secagg_bytes_total`` labels: secure aggregation's stages, by what travels in each (comind/secagg).
SECAGG_STAGES = ("advertise", "share", "masked_input", "unmask")
#: ``comind_secagg_rounds_total`` labels: attempts at a round that were unmasked, or failed for lack of survivors.
SECAGG_RESULTS = ("aggregated", "failed")
#: ``comind_secagg_refusals_total`` labels: each refusal of comind/secagg/errors.py, by name.
SECAGG_REFUSALS = ("wrong_stage", "wrong_round", "not_a_party", "key_advertised_twice", "duplicate_message",
                   "misaddressed_share", "forged_share", "invalid_message")


class PsMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.round = Gauge("comind_round", "Last completed round.", registry=registry)
        self.last_round_time = Gauge(
            "comind_last_round_timestamp_seconds", "When the last round's model was published, or the ps started: Unix "
            "time.",
            registry=registry)
        self.training_done = Gauge("comind_training_done", "1 once the last round is published, else 0.",
                                   registry=registry)
        self.quorum = Gauge(
            "comind_quorum", "Updates a round waits for before its deadline: COMIND_REPLICAS_TO_AGGREGATE, the "
            "workers expected (COMIND_NUM_WORKERS), or those sampled (COMIND_CLIENTS_PER_ROUND); 1 with asynchronous "
            "rounds, where one worker's updates fill any buffer.", registry=registry)
        self.rounds_completed = Counter(
            "comind_rounds_completed", "Rounds completed by this ps process.", registry=registry)
        self.round_duration = Histogram(
            "comind_round_duration_seconds", "Seconds from a round opening to its model being published.",
            buckets=ROUND_BUCKETS, registry=registry)
        self.train_loss = Gauge(
            "comind_train_loss", "Example-weighted training loss of the last round's updates.", registry=registry)
        self.train_accuracy = Gauge(
            "comind_train_accuracy", "Example-weighted training accuracy of the last round's updates.",
            registry=registry)
        self.eval_loss = Gauge(
            "comind_eval_loss", "Loss of the global model on held-out data.", registry=registry)
        self.eval_accuracy = Gauge(
            "comind_eval_accuracy", "Accuracy of the global model on held-out data.", registry=registry)
        self.workers = Gauge("comind_workers", "Live workers (registered, lease not expired).", registry=registry)
        self.updates = Counter(
            "comind_updates", "Updates received, by result.", ["result"], registry=registry)
        self.update_bytes = Counter(
            "comind_update_bytes", "Model and update bytes streamed, as encoded on the wire, by direction.",
            ["direction"], registry=registry)
        self.auth_failures = Counter(
            "comind_auth_failures", "Calls refused for a missing or wrong token.", registry=registry)
        self.checkpoint_seconds = Histogram(
            "comind_checkpoint_duration_seconds", "Seconds to write a checkpoint durably.",
            buckets=CHECKPOINT_BUCKETS, registry=registry)
        self.joins_refused = Counter(
            "comind_joins_refused", "Registrations refused, by reason.", ["reason"], registry=registry)
        self.model_bytes = Gauge("comind_model_bytes", "Size of the global model.", registry=registry)
        self.updates_clipped = Counter(
            "comind_updates_clipped", "Updates whose change from the global model was scaled down to "
            "COMIND_MAX_UPDATE_NORM.", registry=registry)
        self.server_learning_rate = Gauge(
            "comind_server_learning_rate", "Learning rate eta of the ps's server optimizer (COMIND_SERVER_OPTIMIZER).",
            registry=registry)
        self.round_workers = Gauge(
            "comind_round_workers", "Workers of the last round that closed, by status: live (population), selected "
            "to train, reported (updates aggregated) and dropped (selected, not aggregated); async rounds with "
            "sampling: selected is those training, dropped the turns ended without an update.", ["status"],
            registry=registry)
        self.sampling_rate = Gauge(
            "comind_round_sampling_rate", "q of the last round that closed: selected / live workers, or the "
            "Poisson rate with worker-level DP (1 without client sampling); async rounds with sampling: the share "
            "of live workers training.", registry=registry)
        self.server_optimizer = Info(
            "comind_server_optimizer", "The ps's server optimizer, by name (COMIND_SERVER_OPTIMIZER).",
            registry=registry)
        self.dp_epsilon = Gauge(
            "comind_dp_epsilon", "Worker-level differential privacy's epsilon, at COMIND_DP_DELTA, spent by the "
            "rounds so far (the privacy ledger's); NaN without DP.", registry=registry)
        self.dp_clip = Gauge(
            "comind_dp_clip", "The clip C of worker-level DP's next round (COMIND_DP_CLIP; adaptive, it moves).",
            registry=registry)
        self.dp_noise_multiplier = Gauge(
            "comind_dp_noise_multiplier", "Worker-level DP's noise multiplier z (COMIND_DP_NOISE_MULTIPLIER).",
            registry=registry)
        # Asynchronous rounds (comind/async_rounds.py); a version is a round, counted by comind_rounds_completed.
        self.staleness = Histogram(
            "comind_staleness_versions", "Asynchronous rounds: versions published between the one an update "
            "trained from and the one it was taken into (tau).", buckets=STALENESS_BUCKETS, registry=registry)
        self.buffer_updates = Gauge(
            "comind_buffer_updates", "Asynchronous rounds: updates in the buffer of the next version.",
            registry=registry)
        self.buffer_size = Gauge(
            "comind_buffer_size", "Asynchronous rounds: K, the updates that make a version (COMIND_BUFFER_SIZE, or "
            "half the live workers).", registry=registry)
        self.federated_eval = FederatedEvalMetrics(registry)
        self.dp_target_epsilon = Gauge(
            "comind_dp_target_epsilon", "Worker-level DP's budget: training ends at the last round whose epsilon "
            "stays within it (COMIND_DP_TARGET_EPSILON); NaN without one.", registry=registry)
        self.secagg_rounds = Counter(
            "comind_secagg_rounds", "Secure aggregation's attempts at a round: aggregated (unmasked), or failed (too "
            "few survivors to unmask; the previous model stood and the round started again).", ["result"],
            registry=registry)
        self.secagg_dropouts_recovered = Counter(
            "comind_secagg_dropouts_recovered", "Workers that dropped out of a securely aggregated round after "
            "sharing keys, whose masks the survivors' shares removed.", registry=registry)
        self.secagg_bytes = Counter(
            "comind_secagg_bytes", "Secure aggregation's bytes on the wire, both directions, by stage (masked_input: "
            "the masked updates).", ["stage"], registry=registry)
        self.secagg_refusals = Counter(
            "comind_secagg_refusals", "Secure-aggregation messages refused as breaking the protocol (a key advertised "
            "twice, a replayed, forged or misaddressed share, a message of another round), by kind.", ["reason"],
            registry=registry)
        # No loss or accuracy exists before the first round: NaN, not a misleading 0.
        for gauge in (self.train_loss, self.train_accuracy, self.eval_loss, self.eval_accuracy, self.dp_epsilon,
                      self.dp_clip, self.dp_noise_multiplier, self.dp_target_epsilon):
            gauge.set(math.nan)
        # Pre-create labelled series so that they read 0 rather than being absent.
        for result in UPDATE_RESULTS:
            self.updates.labels(result)
        for direction in ("received", "sent"):
            self.update_bytes.labels(direction)
        for reason in JOIN_REFUSALS:
            self.joins_refused.labels(reason)
        for status in ROUND_WORKERS:
            self.round_workers.labels(status)
        for result in SECAGG_RESULTS:
            self.secagg_rounds.labels(result)
        for stage in SECAGG_STAGES:
            self.secagg_bytes.labels(stage)
        for reason in SECAGG_REFUSALS:
            self.secagg_refusals.labels(reason)


class FederatedEvalMetrics:
    """The last federated evaluation (:mod:`comind.federated_eval`): the global model of one round, tested by each
    worker on its own held-out examples; NaN until one is in."""

    def __init__(self, registry: CollectorRegistry):
        self.round = Gauge("comind_federated_eval_round", "Round of the global model the last federated evaluation "
                           "tested.", registry=registry)
        self.workers = Gauge("comind_federated_eval_workers", "Workers that reported in the last federated "
                             "evaluation.", registry=registry)
        self.examples = Gauge("comind_federated_eval_examples", "Held-out examples the workers tested in the last "
                              "federated evaluation.", registry=registry)
        self.accuracy, self.loss = (Gauge(
            f"comind_federated_eval_{figure}", f"The workers' {figure} in the last federated evaluation: min, median "
            f"and max over the workers, and their mean weighted by held-out examples.", ["statistic"],
            registry=registry) for figure in ("accuracy", "loss"))
        self.reports = Counter(
            "comind_federated_eval_reports", "Workers' federated evaluation reports, by result.", ["result"],
            registry=registry)
        for gauge in (self.round, self.workers, self.examples):
            gauge.set(math.nan)
        for statistic in STATISTICS:
            self.accuracy.labels(statistic).set(math.nan)
            self.loss.labels(statistic).set(math.nan)
        for result in FEDERATED_EVAL_RESULTS:
            self.reports.labels(result)

    def show(self, evaluation: Evaluation) -> None:
        self.round.set(evaluation.round)
        self.workers.set(len(evaluation.workers))
        self.examples.set(evaluation.num_examples)
        for figure, gauge in (("accuracy", self.accuracy), ("loss", self.loss)):
            distribution = evaluation.distribution(figure)
            for statistic in STATISTICS:
                gauge.labels(statistic).set(getattr(distribution, statistic))


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.steps = Counter("comind_worker_steps", "Local training steps.", registry=registry)
        self.examples = Counter("comind_worker_examples", "Local training examples.", registry=registry)
        self.loss = Gauge("comind_worker_loss", "Running local training loss.", registry=registry)
        self.sync_duration = Histogram(
            "comind_worker_sync_duration_seconds", "Seconds from pushing an update to holding the next model.",
            buckets=ROUND_BUCKETS, registry=registry)
        self.round = Gauge("comind_worker_round", "Round of the global model this worker holds.",
                           registry=registry)
        self.dp_epsilon = Gauge(
            "comind_worker_dp_epsilon", "Example-level DP-SGD's epsilon, at COMIND_DP_DELTA, spent by this worker's "
            "local steps so far (its own ledger); NaN without example-level DP.", registry=registry)
        self.dp_epsilon.set(math.nan)


def serve(port: int, registry: CollectorRegistry, host: str = "0.0.0.0") -> None:
    """Serves ``/metrics`` on ``host:port``; port 0 turns metrics off."""
    if port:
        try:
            start_http_server(port, addr=host, registry=registry)
        except OSError as error:
            raise ValueError(f"Cannot serve metrics on port {port} of {host!r} ({error.strerror}); set "
                             f"COMIND_METRICS_PORT to a free port (0 turns metrics off), or COMIND_METRICS_HOST to "
                             f"an address of this machine. Received: metrics_port={port}, metrics_host={host!r}"
                             ) from None
        log.info("Metrics on http://%s/metrics", url_host(host, port))


def url_host(host: str, port: int) -> str:
    """``host:port`` as a URL has it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
