"""The ``comind`` command: parses the command line, loads the settings, and hands them to the command.

Commands: ``ps``, ``worker``, ``run``, ``local``, ``health``, ``train`` and ``certificates``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from comind import config, native_output, settings
from comind.errors import PsRefusal, PsUnreachable
from comind.settings import LocalSettings, PsSettings, Settings, TrainSettings, WorkerSettings

COMMANDS = {
    "ps": ("run the parameter server", (settings.PS,)),
    "worker": ("run a worker", (settings.WORKER,)),
    "run": ("run the ps or a worker, as COMIND_ROLE, TF_CONFIG or --job_name says", (settings.PS, settings.WORKER)),
    "local": ("run a ps and N workers as processes on this machine", (settings.LOCAL,)),
    "health": ("check the process that `comind run` started here (the image's health check)",
               (settings.PS, settings.WORKER)),
    "train": ("train on one machine, without a ps", (settings.TRAIN,)),
    "certificates": ("make a private CA and the ps's TLS certificate (for compose and bare machines)", ()),
}
#: What a worker imports to train, beyond the ps's NumPy and gRPC.
TRAINING_PACKAGES = ("tensorflow", "keras", "matplotlib")
# Commands whose role comes from COMIND_ROLE, TF_CONFIG or --job_name.
_ROLE_FROM_ENVIRONMENT = ("run", "health")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comind", description="Federated averaging for Keras models. Every "
                                     "flag is also a COMIND_* variable; a flag wins over a variable.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help, roles) in COMMANDS.items():
        command = commands.add_parser(name, help=help, description=help + ".")
        config.add_options(command, settings.options_for(*roles))
        if name in _ROLE_FROM_ENVIRONMENT:
            config.add_options(command, [settings.ROLE])
        if name == "local":
            command.add_argument("--workers", type=int, default=settings.LOCAL_WORKERS,
                                 help=f"workers to start [default {settings.LOCAL_WORKERS}]")
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    flags = parser.parse_args(argv)
    try:
        loaded = _load(flags, os.environ)
        logging.basicConfig(level=(loaded.log_level if loaded else "info").upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return _run(flags, loaded)
    except ValueError as error:  # bad settings or input: nothing ran
        parser.exit(2, f"comind {flags.command}: error: {error}\n")
    except (PsRefusal, PsUnreachable) as error:
        parser.exit(1, f"comind {flags.command}: error: {error}\n")
    except KeyboardInterrupt:  # Ctrl-C: what was running has been stopped; no traceback to read
        parser.exit(130, f"comind {flags.command}: interrupted\n")


def _load(flags: argparse.Namespace, environ: Mapping[str, str]) -> Settings | None:
    """The command's settings (None for `comind certificates`, which has none)."""
    command: str = flags.command
    if command == "certificates":
        return None
    if command not in _ROLE_FROM_ENVIRONMENT:
        return settings.load(command, vars(flags), environ)
    role = settings.role_from(vars(flags), environ)
    if role is None:
        raise ValueError(f"comind {command} needs a role: set COMIND_ROLE to ps or worker, or give "
                         f"TF_CONFIG (as a TFJob does) or --job_name. Received: role=None")
    return settings.load(role, vars(flags), environ)


def _run(flags: argparse.Namespace, loaded: Settings | None) -> int:
    if flags.command == "health" and isinstance(loaded, (PsSettings, WorkerSettings)):
        from comind.health import problem

        trouble = problem(loaded)
        print(f"unhealthy: {trouble}" if trouble else "healthy")
        return 1 if trouble else 0
    if loaded is None:
        return _certificates(flags)
    if isinstance(loaded, PsSettings):
        from comind.ps_main import run_ps

        return run_ps(loaded)
    if isinstance(loaded, LocalSettings):
        from comind import datasets
        from comind.local import run_local
        from comind.ps_main import round_policy, server_pipeline

        # Bad settings or data fail here, in one line, rather than in the logs of the ps and of every worker.
        server_pipeline(loaded.ps, round_policy(loaded.ps))
        # The workers train in processes of their own: this one only checks that they can import what they
        # need, and so refuses a setting in a fraction of a second rather than after importing TensorFlow.
        missing = [name for name in TRAINING_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            raise ValueError(_needs_training(flags.command, f"no module named {missing[0]!r}"))
        datasets.load(loaded.worker.dataset, loaded.worker.data_dir)
        return run_local(loaded)
    # TensorFlow's start-up chatter (CPU features, oneDNN) says nothing a user can act on.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        with native_output.caught(native_output.shown(loaded.log_level)):
            from comind import worker
    except ImportError as error:
        raise ValueError(_needs_training(flags.command, error)) from None
    if isinstance(loaded, WorkerSettings):
        return worker.run_worker(loaded)
    assert isinstance(loaded, TrainSettings)
    return worker.run_train(loaded)


def _needs_training(command: str, error: object) -> str:
    return f"comind {command} needs TensorFlow and matplotlib ({error}); install them with pip install 'comind[train]'."


def _certificates(flags: argparse.Namespace) -> int:
    try:
        from comind.certificates import run_certificates
    except ImportError:
        raise ValueError("comind certificates needs the cryptography package: pip install 'comind[tls]'. "
                         "Received: no module named cryptography") from None
    return run_certificates(flags.out, flags.hosts, flags.workers)
