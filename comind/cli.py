"""The ``comind`` command: ``ps``, ``worker``, ``run``, ``local`` and ``train``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from comind import cluster_spec, config
from comind.errors import PsRefusal, PsUnreachable

if TYPE_CHECKING:  # imported where used: `comind health` stays light
    from comind.pipeline import ServerPipeline

COMMANDS = {
    "ps": ("run the parameter server", (config.PS,)),
    "worker": ("run a worker", (config.WORKER,)),
    "run": ("run the ps or a worker, as COMIND_ROLE, TF_CONFIG or --job_name says", (config.PS, config.WORKER)),
    "local": ("run a ps and N workers as processes on this machine", (config.PS, config.WORKER)),
    "health": ("check the process that `comind run` started here (the image's health check)",
               (config.PS, config.WORKER)),
    "train": ("train on one machine, without a ps", (config.TRAIN,)),
    "certificates": ("make a private CA and the ps's TLS certificate (for compose and bare machines)", ()),
}
# How the ps announces its port (port 0 picks a free one): `comind local` and
# the tests read the port back from this line.
LISTENING = re.compile(r"Listening on \S+:(\d+)")
# Commands whose role comes from COMIND_ROLE, TF_CONFIG or --job_name.
_ROLE_FROM_ENVIRONMENT = ("run", "health")
# Set by `comind local` itself for each process it starts.
_LOCAL_ONLY = {"listen", "ps_address", "task_index", "num_workers", "token", "token_file", "tls_cert", "tls_key",
               "tls_ca"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comind", description="Federated averaging for Keras models. Every "
                                     "flag is also a COMIND_* variable; a flag wins over a variable.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help, roles) in COMMANDS.items():
        command = commands.add_parser(name, help=help, description=help + ".")
        options = _options(name)
        config.add_options(command, options)
        if name in _ROLE_FROM_ENVIRONMENT:
            config.add_options(command, [o for o in config.OPTIONS if o.name == "role"])
        if name == "local":
            command.add_argument("--workers", type=int, default=2, help="workers to start [default 2]")
        if name == "certificates":
            command.add_argument("--out", required=True, help="folder for ca.pem, ps.pem, ps-key.pem; "
                                 "left as it is if it already holds them")
            command.add_argument("--hosts", default="ps,localhost,127.0.0.1",
                                 help="comma-separated names and addresses workers dial the ps by "
                                      "[default ps,localhost,127.0.0.1]")
            command.add_argument("--workers", type=int, default=0,
                                 help="client certificates to make, for mutual TLS [default 0]")
        if name in ("ps", "worker", "run", "health"):
            original = command.add_argument_group("the original tutorials' flags")
            original.add_argument("--job_name", dest="original_job_name", choices=("ps", "worker"))
            original.add_argument("--task_index", dest="original_task_index", type=int)
            original.add_argument("--ps_hosts", dest="original_ps_hosts", help="comma-separated host:port list")
            original.add_argument("--worker_hosts", dest="original_worker_hosts",
                                  help="comma-separated host:port list")
    return parser


def _options(command: str) -> tuple[config.Option, ...]:
    options = config.options_for(*COMMANDS[command][1])
    return tuple(o for o in options if o.name not in _LOCAL_ONLY) if command == "local" else options


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    flags = parser.parse_args(argv)
    try:
        settings = _settings(flags, os.environ)
        logging.basicConfig(level=settings.get("log_level", "info").upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return _run(flags, settings)
    except ValueError as error:  # bad settings or input: nothing ran
        parser.exit(2, f"comind {flags.command}: error: {error}\n")
    except (PsRefusal, PsUnreachable) as error:
        parser.exit(1, f"comind {flags.command}: error: {error}\n")


def _settings(flags: argparse.Namespace, environ) -> dict:
    cluster = cluster_spec.from_tf_config(environ["TF_CONFIG"]) if environ.get("TF_CONFIG") else {}
    # The original flags are flags: they win over variables, but not over the new flags.
    original = cluster_spec.from_original_flags(*(getattr(flags, f"original_{f}", None) for f in
                                                   ("job_name", "task_index", "ps_hosts", "worker_hosts")))
    for name, value in original.items():
        if getattr(flags, name, None) is None:
            setattr(flags, name, value)
    if flags.command not in _ROLE_FROM_ENVIRONMENT:
        return config.resolve(_options(flags.command), flags, environ, cluster)
    role = config.resolve([o for o in config.OPTIONS if o.name == "role"], flags, environ, cluster)["role"]
    if role is None:
        raise ValueError(f"comind {flags.command} needs a role: set COMIND_ROLE to ps or worker, or give "
                         f"TF_CONFIG (as a TFJob does) or --job_name. Received: role=None")
    return {**config.resolve(_options(role), flags, environ, cluster), "role": role}


def _run(flags: argparse.Namespace, settings: dict) -> int:
    command = settings.get("role", flags.command) if flags.command == "run" else flags.command
    if command == "health":
        from comind.health import problem

        trouble = problem(settings["role"], settings)
        print(f"unhealthy: {trouble}" if trouble else "healthy")
        return 1 if trouble else 0
    if command == "certificates":
        return make_certificates(flags)
    if command == "ps":
        return run_ps(settings)
    # TensorFlow's start-up chatter (CPU features, oneDNN) says nothing a user can act on.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        from comind import worker
    except ImportError as error:
        raise ValueError(f"comind {flags.command} needs TensorFlow and matplotlib ({error}); install them with "
                         f"pip install 'comind[train]'.") from None
    if command == "worker":
        return worker.run_worker(settings)
    if command == "train":
        return worker.run_train(settings)
    from comind.local import run_local

    if flags.workers < 1:
        raise ValueError(f"--workers must be at least 1. Received: --workers={flags.workers}")
    server_pipeline(settings, flags.workers)  # fails here rather than in the ps's log
    return run_local(settings, flags.workers)


def server_pipeline(settings: dict, num_workers: int) -> ServerPipeline:
    """The ps's round pipeline, checked against the updates its rounds will have."""
    from comind.pipeline import PipelineSettings, ServerPipeline

    pipeline = ServerPipeline(PipelineSettings(
        weighting=settings["weighting"], aggregation=settings["aggregation"],
        trim_fraction=settings["trim_fraction"], max_update_norm=settings["max_update_norm"]))
    pipeline.check_quorum(settings["replicas_to_aggregate"] or num_workers)
    return pipeline


def make_certificates(flags: argparse.Namespace) -> int:
    try:
        from comind.certificates import write_cluster
    except ImportError:
        raise ValueError("comind certificates needs the cryptography package: pip install 'comind[tls]'. "
                         "Received: no module named cryptography") from None
    hosts = [h.strip() for h in flags.hosts.split(",") if h.strip()]
    written = write_cluster(flags.out, hosts, flags.workers)
    if written is None:
        print(f"{flags.out} already holds the cluster's certificates; kept them.")
    else:
        print(f"Wrote {', '.join(p.name for p in written)} to {flags.out}; the CA's key is gone. Give workers "
              f"{written[0]}; the ps's certificate is valid for {', '.join(hosts)}.")
    return 0


def run_ps(settings: dict) -> int:
    from prometheus_client import REGISTRY

    from comind import metrics, service
    from comind.auth import TlsFiles, load_token
    from comind.checkpoint import CheckpointStore
    from comind.ps import ParameterServer
    from comind.rounds import RoundPolicy

    log = logging.getLogger("comind.ps")
    policy = RoundPolicy(
        num_workers=settings["num_workers"], replicas_to_aggregate=settings["replicas_to_aggregate"],
        min_updates=settings["min_updates"], lease_seconds=settings["lease_seconds"],
        round_timeout=settings["round_timeout"], total_rounds=settings["rounds"])
    token = load_token(settings["token"], settings["token_file"])
    tls = TlsFiles(settings["tls_cert"], settings["tls_key"], settings["tls_ca"])
    store = CheckpointStore(settings["checkpoint_dir"], settings["keep_checkpoints"]) \
        if settings["checkpoint_dir"] else None
    pipeline = server_pipeline(settings, settings["num_workers"])

    async def serve() -> int:
        ps = ParameterServer(policy, metrics.PsMetrics(REGISTRY), pipeline=pipeline, store=store,
                             max_model_bytes=settings["max_model_bytes"],
                             max_concurrent_updates=settings["max_concurrent_updates"])
        server, port = service.build_server(ps, settings["listen"], token, tls)
        metrics.serve(settings["metrics_port"], REGISTRY)
        if not token:
            log.warning("AUTHENTICATION IS OFF: anyone who reaches this port can read and change the model. "
                        "Set COMIND_TOKEN or COMIND_TOKEN_FILE.")
        host = settings["listen"].rsplit(":", 1)[0]
        log.info("Listening on %s:%d (%s), round %d of %d.", host, port, "TLS" if tls.enabled else "plain text",
                 ps.rounds.round, policy.total_rounds)
        if pipeline.aggregator.holds_updates:
            log.info("Aggregating by the coordinate-wise %s: every update of a round is held in memory.",
                     settings["aggregation"])
        if pipeline.clip:
            log.info("Each update is clipped to norm %g.", pipeline.clip.max_norm)
        return await service.run(ps, server, settings["exit_grace"])

    return asyncio.run(serve())
