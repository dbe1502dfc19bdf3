"""``comind ps``: the parameter server's process, from its settings.

The ps's machinery (gRPC, NumPy, the checkpoints) is imported when the ps
runs, not with this module: `comind local` and the tests import it for
:data:`LISTENING` alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import re
from typing import TYPE_CHECKING

from comind import modes

if TYPE_CHECKING:
    from comind.pipeline import ServerPipeline
    from comind.privacy import DpSettings
    from comind.rounds import RoundPolicy
    from comind.secagg.config import SecAggSettings
    from comind.server_optimizers import ServerOptimizerSettings
    from comind.settings import PsSettings

# How the ps announces its port (port 0 picks a free one): `comind local` and
# the tests read the port back from this line.
LISTENING = re.compile(r"Listening on \S+:(\d+)")


def server_pipeline(settings: PsSettings, policy: RoundPolicy) -> ServerPipeline:
    """The ps's round pipeline, checked against the updates its rounds (``round_policy(settings)``) will have."""
    from comind.pipeline import PipelineSettings, ServerPipeline

    name, optimizer = server_optimizer(settings)
    privacy = dp_settings(settings, policy)
    secure = secure_aggregation(settings, privacy)
    pipeline = ServerPipeline(PipelineSettings(
        mode=settings.mode, weighting=settings.weighting or ("uniform" if privacy or secure else "examples"),
        aggregation=settings.aggregation, trim_fraction=settings.trim_fraction,
        max_update_norm=settings.max_update_norm, server_optimizer=name, server_optimizer_settings=optimizer,
        update_encoding=settings.update_encoding, model_encoding=settings.model_encoding, privacy=privacy,
        rounds_mode=settings.rounds_mode, secure_aggregation=secure))
    pipeline.check_quorum(policy.expected_updates)
    return pipeline


def round_policy(settings: PsSettings) -> RoundPolicy:
    """The ps's round rules from its settings.

    With worker-level DP, client sampling draws Poisson samples, q fixed for
    the run (:meth:`SamplingPolicy.poisson`): the sampling DP-FedAvg's
    accountant counts (docs/design.md, decision 15).

    Raises:
        ValueError: settings that contradict each other (no round could close as they say, or the privacy
            ledger would not account the rounds as they are).
    """
    from comind.async_rounds import ASYNC, AsyncPolicy
    from comind.rounds import RoundPolicy
    from comind.sampling import SamplingPolicy

    sampling = SamplingPolicy(clients_per_round=settings.clients_per_round,
                              client_fraction=settings.client_fraction, over_selection=settings.over_selection)
    if sampling.enabled and (settings.dp_noise_multiplier is not None or settings.dp_clip is not None):
        if settings.secure_aggregation:
            # A Poisson draw of fewer than two workers has no one to add the noise, or no sum to hide an update in.
            raise ValueError("Client sampling with worker-level differential privacy draws Poisson samples, which "
                             "may select fewer than the two workers secure aggregation needs, and distributed noise "
                             "has no answer for those rounds yet: unset COMIND_CLIENTS_PER_ROUND and "
                             "COMIND_CLIENT_FRACTION, or turn COMIND_SECURE_AGGREGATION off. Received: "
                             "secure_aggregation=True with client sampling and DP")
        sampling = sampling.poisson(settings.num_workers)
    if settings.federated_eval_every and settings.rounds_mode == ASYNC:
        # A version's updates come from several older models: their reports would not test one model.
        raise ValueError("Federated evaluation tests one global model per round, and asynchronous rounds have none: "
                         "set COMIND_FEDERATED_EVAL_EVERY to 0, or COMIND_ROUNDS_MODE to sync. Received: "
                         f"federated_eval_every={settings.federated_eval_every}, rounds_mode={ASYNC!r}")
    return RoundPolicy(
        num_workers=settings.num_workers, replicas_to_aggregate=settings.replicas_to_aggregate,
        min_updates=settings.min_updates, lease_seconds=settings.lease_seconds,
        round_timeout=settings.round_timeout, total_rounds=settings.rounds, max_members=settings.max_members,
        sampling=sampling, asynchronous=AsyncPolicy(settings.buffer_size, settings.staleness_exponent,
                                                    settings.max_staleness) if settings.rounds_mode == ASYNC else None)


def dp_settings(settings: PsSettings, policy: RoundPolicy) -> DpSettings | None:
    """Worker-level DP's settings, or None when it is off.

    Raises:
        ValueError: noise without a clip, a clip without noise, or replicas to aggregate.
    """
    from comind.privacy import ADAPTIVE, DpSettings

    z, clip = settings.dp_noise_multiplier, settings.dp_clip
    if z is None and clip is None:
        return None
    if clip is None:
        raise ValueError(f"Noise without a clip protects no one: each worker's influence on the sum, which the noise "
                         f"must cover, is unbounded. Set COMIND_DP_CLIP (a norm, or adaptive) with "
                         f"COMIND_DP_NOISE_MULTIPLIER. Received: dp_noise_multiplier={z!r}, dp_clip=None")
    if settings.replicas_to_aggregate is not None:
        raise ValueError(f"With worker-level differential privacy a round takes the update of every worker in it: "
                         f"closing at the first COMIND_REPLICAS_TO_AGGREGATE lets one worker's presence push out "
                         f"another's update, a change of 2C that the noise does not cover. Unset it (the fixed "
                         f"denominator is COMIND_NUM_WORKERS, or q times it with client sampling). "
                         f"Received: replicas_to_aggregate={settings.replicas_to_aggregate}")
    if z is None:
        raise ValueError(f"COMIND_DP_CLIP without COMIND_DP_NOISE_MULTIPLIER is a clip, not privacy; set the noise "
                         f"multiplier, or bound updates with COMIND_MAX_UPDATE_NORM instead. Received: "
                         f"dp_clip={clip!r}, dp_noise_multiplier=None")
    q = policy.sampling.poisson_rate
    return DpSettings(
        noise_multiplier=z, clip=None if clip == ADAPTIVE else float(clip),
        # The fixed denominator: the updates a round takes; under Poisson sampling, the expected sample q N.
        expected_updates=policy.expected_updates if q is None else q * policy.num_workers,
        initial_clip=settings.dp_initial_clip, target_quantile=settings.dp_target_quantile,
        clip_learning_rate=settings.dp_clip_learning_rate, delta=settings.dp_delta,
        accountant=settings.dp_accountant, target_epsilon=settings.dp_target_epsilon)


def secure_aggregation(settings: PsSettings, privacy: DpSettings | None = None) -> SecAggSettings | None:
    """Secure aggregation's settings, or None when it is off; with ``privacy``, the noise its workers add.

    Raises:
        ValueError: its packages are missing, or it is asked with replicas to aggregate.
    """
    from comind.secagg.config import SecAggSettings

    if not settings.secure_aggregation:
        return None
    try:
        import Crypto.Protocol.SecretSharing  # noqa: F401 - only to say now that it is missing
        import cryptography  # noqa: F401
    except ImportError as error:
        raise ValueError(f"Secure aggregation needs the cryptography and pycryptodome packages: pip install "
                         f"'comind[secagg]'. Received: {error}") from None
    if settings.replicas_to_aggregate is not None:
        raise ValueError(f"Under secure aggregation a round's masked inputs are unmasked together, so it cannot close "
                         f"at the first COMIND_REPLICAS_TO_AGGREGATE of them and leave the rest as backups: unset it "
                         f"(client sampling, --clients-per-round, picks a round's workers instead). Received: "
                         f"replicas_to_aggregate={settings.replicas_to_aggregate}")
    from comind.privacy import DistributedNoise

    # Adaptive clipping (no fixed C) is refused by the pipeline's settings, which see both.
    noise = DistributedNoise(privacy.noise_multiplier, privacy.clip, privacy.expected_updates) \
        if privacy is not None and privacy.clip is not None else None
    return SecAggSettings(settings.secagg_threshold, settings.secagg_neighbours, settings.secagg_clip_range,
                          settings.max_update_norm, noise)


def server_optimizer(settings: PsSettings) -> tuple[str, ServerOptimizerSettings]:
    """The server optimizer the settings name, and its hyperparameters: those given, else the mode's defaults.

    In distributed mode the defaults are Keras's Adam at the original's learning rate (:mod:`comind.modes`).
    """
    from comind.server_optimizers import ServerOptimizerSettings

    if settings.mode == modes.DISTRIBUTED:
        name = settings.server_optimizer or modes.DISTRIBUTED_SERVER_OPTIMIZER
        defaults = ServerOptimizerSettings(learning_rate=modes.distributed_learning_rate(settings.num_workers),
                                           beta1=modes.ADAM_BETA1, beta2=modes.ADAM_BETA2, epsilon=modes.ADAM_EPSILON)
    else:
        name, defaults = settings.server_optimizer or modes.FEDERATED_SERVER_OPTIMIZER, ServerOptimizerSettings()
    given = {"learning_rate": settings.server_learning_rate, "momentum": settings.server_momentum,
             "beta1": settings.server_beta1, "beta2": settings.server_beta2, "epsilon": settings.server_epsilon}
    return name, dataclasses.replace(defaults, **{key: value for key, value in given.items() if value is not None})


#: The ps keeps hundreds of thousands of objects alive: its members, their open calls, gRPC's state for each.
#: Python's default thresholds (700, 10, 10) had full collections walk them all often enough to take a sixth of
#: the ps's CPU with 10,000 workers waiting (bench/load.py); a call's own garbage is freed by reference counts.
GC_THRESHOLDS = (50_000, 20, 100)


def run_ps(settings: PsSettings) -> int:
    from prometheus_client import REGISTRY

    from comind import metrics, service
    from comind.auth import TlsFiles, load_token
    from comind.checkpoint import CheckpointStore
    from comind.ps import ParameterServer
    from comind.settings import SERVE

    log = logging.getLogger("comind.ps")
    policy = round_policy(settings)
    token = load_token(settings.token, settings.token_file)
    tls = TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_ca)
    store = CheckpointStore(settings.checkpoint_dir, settings.keep_checkpoints) \
        if settings.checkpoint_dir else None
    pipeline = server_pipeline(settings, policy)

    async def serve() -> int:
        ps = ParameterServer(policy, metrics.PsMetrics(REGISTRY), pipeline=pipeline, store=store,
                             max_model_bytes=settings.max_model_bytes,
                             max_concurrent_updates=settings.max_concurrent_updates,
                             max_examples_per_update=settings.max_examples_per_update,
                             federated_eval_every=settings.federated_eval_every)
        server, port = service.build_server(ps, settings.listen, token, tls, settings.long_poll_seconds)
        metrics.serve(settings.metrics_port, REGISTRY, settings.metrics_host)
        if not token:
            log.warning("AUTHENTICATION IS OFF: anyone who reaches this port can read and change the model. "
                        "Set COMIND_TOKEN or COMIND_TOKEN_FILE.")
        host = settings.listen.rsplit(":", 1)[0]
        log.info("Listening on %s:%d (%s), round %d of %d.", host, port, "TLS" if tls.enabled else "plain text",
                 ps.round, policy.total_rounds)
        if (settings.replicas_to_aggregate or 0) > settings.num_workers:
            log.warning("Rounds close at %d updates, more than the %d workers expected: each will wait for its "
                        "deadline (%.0f s) unless more workers join. Lower COMIND_REPLICAS_TO_AGGREGATE or raise "
                        "COMIND_NUM_WORKERS.", settings.replicas_to_aggregate, settings.num_workers,
                        settings.round_timeout)
        sampling = policy.sampling
        if sampling.poisson_rate is not None:
            log.info("Client sampling with worker-level differential privacy: each round selects each live worker "
                     "independently with probability q %r (Poisson sampling, as the privacy ledger counts) and closes "
                     "once every selected worker still live has sent its update, or at its deadline with those in; "
                     "the seed of each draw is logged.", sampling.poisson_rate)
        elif sampling.enabled and policy.asynchronous is not None:
            log.info("Client sampling with asynchronous rounds: %s of the live workers train at once, drawn uniformly; "
                     "each turn that ends (an update taken, a worker gone or silent) passes to a worker drawn from "
                     "those not training, and a version takes %d updates with the %d workers expected; the seed of "
                     "each draw is logged.", sampling.clients_per_round or f"a fraction {sampling.client_fraction}",
                     policy.expected_updates, policy.num_workers)
        elif sampling.enabled:
            log.info("Client sampling: each round selects %s of the live workers (over-selection %g) and closes at "
                     "%d updates with the %d workers expected; the seed of each draw is logged.",
                     sampling.clients_per_round or f"a fraction {sampling.client_fraction}", sampling.over_selection,
                     policy.expected_updates, policy.num_workers)
        if pipeline.aggregator.holds_updates:
            log.info("Aggregating by the coordinate-wise %s: every update of a round is held in memory.",
                     settings.aggregation)
        if settings.mode == modes.DISTRIBUTED:
            log.info("Distributed mode: every round is one step of every worker, applied by %s at learning rate "
                     "%g.", pipeline.settings.server_optimizer, pipeline.optimizer.learning_rate)
        elif pipeline.settings.server_optimizer != "fedavg" or pipeline.optimizer.learning_rate != 1.0:
            log.info("Server optimizer %s with learning rate %g.", pipeline.settings.server_optimizer,
                     pipeline.optimizer.learning_rate)
        if not (pipeline.update_encoding.identity and pipeline.model_encoding.identity):
            log.info("Updates come in as %s; the model goes down as %s.", pipeline.update_encoding.name,
                     pipeline.model_encoding.name)
        if settings.federated_eval_every:
            log.info("Federated evaluation: every %d rounds each worker tests the global model on its held-out "
                     "examples and reports with its next update.", settings.federated_eval_every)
        if pipeline.clip:
            log.info("Each update is clipped to norm %g.", pipeline.clip.max_norm)
        if pipeline.privacy:
            dp = pipeline.privacy.settings
            log.info("Worker-level differential privacy: each update clipped to %s, counted once (uniform "
                     "weighting%s), noise multiplier %g, sum over %g expected updates; epsilon at delta %g by the %s "
                     "accountant%s.",
                     f"norm {dp.clip:g}" if dp.clip else f"an adaptive norm from {dp.initial_clip:g}",
                     "" if settings.weighting else ", set by DP", dp.noise_multiplier, dp.expected_updates, dp.delta,
                     dp.accountant.upper(), f", within {dp.target_epsilon:g}" if dp.target_epsilon else "")
            noise = pipeline.settings.secure_aggregation.noise if pipeline.settings.secure_aggregation else None
            if noise is not None:
                log.info("Under secure aggregation each worker clips its update and adds its share of the noise "
                         "(std %.4g) before masking; a round with dropouts holds less noise and is accounted at the "
                         "noise multiplier its survivors' shares make.", noise.share_std)
            if settings.federated_eval_every:
                log.warning("Federated evaluation's reports are each worker's own loss and accuracy on its data, "
                            "outside the differential privacy guarantee: set COMIND_FEDERATED_EVAL_EVERY to 0 where "
                            "a worker's figures must stay private.")
            if dp.expected_updates < 100 and not sampling.enabled:
                log.warning("Worker-level DP over %d workers a round gives no meaningful epsilon: every worker is in "
                            "every round, and hiding one of a handful takes noise that swamps the model. It is for "
                            "large populations, sampled; a few data holders need example-level DP on each instead "
                            "(README, \"Differential privacy\").", dp.expected_updates)
        return await service.run(ps, server, settings.exit_grace, serve=settings.after_training == SERVE)

    gc.set_threshold(*GC_THRESHOLDS)
    return asyncio.run(serve())
