"""Cluster descriptions of the TensorFlow world, mapped onto coMind's settings.

Two sources describe a cluster the way the original tutorials and Kubeflow
do: ``TF_CONFIG`` (as a TFJob writes it) and the original flags
``--job_name --task_index --ps_hosts --worker_hosts``. Both become the same
few settings: ``role``, ``task_index``, ``ps_address``, ``listen`` and
``num_workers``.

A TFJob may run a separate ``chief`` (or ``master``) replica beside its
workers: that replica is coMind's task 0, and worker ``i`` becomes task
``i + 1``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypedDict

_CHIEF_TYPES = ("chief", "master")


class ClusterSettings(TypedDict, total=False):
    """The settings a cluster description gives, by the name of the setting; only those it says."""

    role: str
    task_index: int
    ps_address: str
    listen: str
    num_workers: int


def from_tf_config(text: str) -> ClusterSettings:
    """Settings from a ``TF_CONFIG`` JSON document; keys coMind does not use are ignored.

    Jobs may be lists of addresses, or maps from task index to address.
    """
    try:
        config = json.loads(text)
    # ValueError: an integer of thousands of digits; RecursionError: arrays nested thousands deep.
    except (ValueError, RecursionError) as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}). Received: TF_CONFIG={text!r}") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        raise ValueError(f"TF_CONFIG needs a \"cluster\" object mapping jobs to addresses. "
                         f"Received: TF_CONFIG={text!r}")
    jobs = {name: _addresses(name, job, text) for name, job in config["cluster"].items()}
    task = config.get("task") or {}
    if not isinstance(task, dict):
        raise ValueError(f"TF_CONFIG's task must be an object with a type and an index. Received: TF_CONFIG={text!r}")
    kind, index = task.get("type"), task.get("index", 0)
    _check_index(index, f"TF_CONFIG={text!r}")
    chiefs = [a for name in _CHIEF_TYPES for a in jobs.get(name, [])]
    return _settings(kind, index, jobs.get("ps", []), chiefs, jobs.get("worker", []), f"TF_CONFIG={text!r}")


def from_original_flags(job_name: str | None, task_index: int | None, ps_hosts: str | None,
                        worker_hosts: str | None) -> ClusterSettings:
    """Settings from the original tutorials' flags (comma-separated host lists)."""
    if not any(v is not None for v in (job_name, task_index, ps_hosts, worker_hosts)):
        return {}
    ps = [h for h in (ps_hosts or "").split(",") if h]
    workers = [h for h in (worker_hosts or "").split(",") if h]
    received = (f"--job_name={job_name!r}, --task_index={task_index!r}, --ps_hosts={ps_hosts!r}, "
                f"--worker_hosts={worker_hosts!r}")
    task_index = task_index or 0
    _check_index(task_index, received)
    return _settings(job_name, task_index, ps, [], workers, received)


def _check_index(index: Any, received: str) -> None:
    # bool is an int to Python, but `true` is no task index.
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"The task index must be an integer >= 0. Received: {received}")


def _addresses(name: str, job: Any, text: str) -> list[str]:
    if isinstance(job, list):
        return [str(a) for a in job]
    if isinstance(job, dict):  # sparse form: {"0": "host:port", ...}
        try:
            return [str(job[k]) for k in sorted(job, key=int)]
        except ValueError:
            pass
    raise ValueError(f"TF_CONFIG's job {name!r} must be a list of addresses or a map from task index to "
                     f"address. Received: TF_CONFIG={text!r}")


def _settings(kind: str | None, index: int, ps: Sequence[str], chiefs: Sequence[str], workers: Sequence[str],
              received: str) -> ClusterSettings:
    settings: ClusterSettings = {}
    if ps:
        settings["ps_address"] = ps[0]
    if chiefs or workers:
        settings["num_workers"] = len(chiefs) + len(workers)
    if kind == "ps":
        if index >= len(ps):
            raise ValueError(f"The ps task index {index} has no address in the ps job. Received: {received}")
        settings.update({"role": "ps", "listen": "0.0.0.0:" + ps[index].rpartition(":")[2]})
    elif kind in _CHIEF_TYPES:
        settings.update({"role": "worker", "task_index": 0})
    elif kind == "worker":
        settings.update({"role": "worker", "task_index": index + len(chiefs)})
    elif kind is not None:
        raise ValueError(f"coMind runs tasks of type ps, worker or chief (the chief also evaluates); "
                         f"{kind!r} is not one of them. Received: {received}")
    return settings

