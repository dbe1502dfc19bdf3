"""The ``comind`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from comind import config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="comind", description="Federated averaging for Keras models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ps = commands.add_parser("ps", help="run the parameter server",
                             description="Run the parameter server. Every flag is also a COMIND_* variable.")
    config.add_options(ps, config.PS_OPTIONS)
    flags = parser.parse_args(argv)
    try:
        settings = config.resolve(config.PS_OPTIONS, flags, os.environ)
        logging.basicConfig(level=settings["log_level"].upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return run_ps(settings)
    except ValueError as error:
        parser.exit(2, f"comind {flags.command}: error: {error}\n")


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

    async def serve() -> None:
        ps = ParameterServer(policy, metrics.PsMetrics(REGISTRY), weighting=settings["weighting"], store=store,
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
        await service.run(ps, server, settings["exit_grace"])

    asyncio.run(serve())
    return 0
