"""Each role's settings, as a frozen dataclass built from flags, ``COMIND_*`` variables and ``TF_CONFIG``.

Every setting is declared once, as a field of the dataclass of the role
that has it, or of a base class that the roles sharing it have in common;
the field carries its :class:`comind.config.Option` (default, help, parser,
choices), and its flag and variable derive from the field's name. Declaring
a field again in another class is an error at import.

:func:`load` is the one place settings are built. A flag wins over a
variable, a variable over ``TF_CONFIG`` (or the original tutorials' cluster
flags ``--job_name --task_index --ps_hosts --worker_hosts``), and those over
the default (docs/design.md, decision 7)::

    settings.load("ps", {"rounds": "7"}, {"COMIND_ROUNDS": "9"}).rounds == 7
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, overload

from comind import cluster_spec, config, modes, presets
from comind.protocol import LONG_POLL_SECONDS

PS, WORKER, TRAIN, LOCAL = "ps", "worker", "train", "local"
#: Workers `comind local` starts unless told otherwise.
LOCAL_WORKERS = 2
#: Where `comind local`'s ps listens: loopback, on a port the system picks.
LOCAL_LISTEN = "127.0.0.1:0"
#: The ps's metrics port unless told otherwise; worker ``i`` serves on this plus ``1 + i``.
PS_METRICS_PORT = 8000
#: Settings that `comind local` sets itself for each process it starts: it takes them from no flag or variable.
LOCAL_ONLY = frozenset({"listen", "ps_address", "task_index", "num_workers", "token", "token_file", "tls_cert",
                        "tls_key", "tls_ca", "after_training"})
#: What the ps and the workers do after the last round (``after_training``).
EXIT, SERVE = "exit", "serve"

_OPTION = "comind.option"


def _setting(default: Any, help: str, parse: Callable[[str], Any] = str,
             choices: config.Choices | None = None) -> Any:
    """A field declared by its option; the name comes from the field (see :func:`options_of`)."""
    return dataclasses.field(metadata={_OPTION: config.Option("", default, help, parse, choices)})


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Common:
    """Settings of every role."""

    dataset: str = _setting("digits", "digits (embedded), fashion_mnist, cifar10, or a .npz path",
                            config.dataset_name)
    log_level: str = _setting("info", "logging level", str, ("debug", "info", "warning", "error"))
    #: Worker-level DP's on the ps; example-level DP-SGD's on a worker and in `comind train`.
    dp_delta: float = _setting(1e-5, "the delta at which epsilon is given; below 1 / the population (worker-level "
                               "DP) or 1 / a worker's examples (example-level)", config.fraction_between)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Cluster(_Common):
    """Settings of the ps and the workers alike: they must agree on these."""

    num_workers: int = _setting(2, "workers expected (quorum, sharding)", config.positive_int)
    mode: str = _setting(
        modes.FEDERATED, "federated: workers average weights every interval steps, each with its own optimizer; "
        "distributed: every step's gradients are averaged and one Adam on the ps applies them (the original's "
        "SyncReplicasOptimizer)", str, modes.MODES)
    interval_steps: int = _setting(100, "local steps between syncs in federated mode (1: average after every step)",
                                   config.positive_int)
    #: Unset, the data set's preset for ``interval_steps`` (:func:`comind.presets.default_rounds`).
    rounds: int = _setting(None, "rounds to train; unset: the data set's preset", config.positive_int)
    #: Unset, :data:`PS_METRICS_PORT` on the ps and the next ports on the workers, so that a ps and workers on
    #: one host do not collide; unset, the host is the ps's listen host, every address on a worker.
    metrics_port: int = _setting(None, f"Prometheus port; 0 turns metrics off; unset: {PS_METRICS_PORT} on the "
                                       f"ps, {PS_METRICS_PORT + 1} plus the task index on a worker", config.port)
    metrics_host: str = _setting(None, "address the metrics server binds; unset: the host the ps listens on, "
                                       "every address (0.0.0.0) on a worker")
    token: str | None = _setting(None, "shared token every call must carry")
    token_file: str | None = _setting(None, "file holding the shared token")
    tls_cert: str | None = _setting(None, "PEM certificate (the ps's, or a worker's own for mutual TLS)")
    tls_key: str | None = _setting(None, "PEM private key of that certificate")
    tls_ca: str | None = _setting(None, "PEM CA: a worker verifies the ps with it; a ps given one requires "
                                        "client certificates it signed (mutual TLS)")
    #: A Kubernetes Job needs processes that end; a StatefulSet restarts every one that does (README, Kubernetes).
    after_training: str = _setting(
        EXIT, "after the last round: exit (status 0; the ps once the workers left, at most --exit-grace seconds "
        "later, and so does a ps resumed from a final checkpoint) or serve (stay up until stopped: the ps serving "
        "the final model, a worker idle)", str, (EXIT, SERVE))


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Training(_Common):
    """Settings of whoever trains a model: a worker, or `comind train` alone."""

    model: str = _setting("basic", "basic, advanced, or module:function for your own", config.model_spec)
    data_dir: str | None = _setting(None, "directory with the original Fashion-MNIST or CIFAR-10 files")
    seed: int = _setting(0, "random seed of the split and the initial weights", config.non_negative_int)
    batch_size: int = _setting(32, "examples per local step", config.positive_int)
    learning_rate: float = _setting(1e-3, "Adam learning rate of the built-in models", config.positive_float)
    output_dir: str = _setting("./comind-output", "where the chief writes the model and pictures")
    # Example-level differential privacy (comind/dpsgd.py).
    dp_example_clip: float | None = _setting(
        None, "example-level DP-SGD (Abadi et al. 2016): C, the clip on each training example's gradient's L2 norm "
        "over all the model's variables; needs --dp-example-noise-multiplier; unset: no example-level DP",
        config.positive_float)
    dp_example_noise_multiplier: float | None = _setting(
        None, "example-level DP-SGD's z: each local step adds Gaussian noise of std z C to the sum of the clipped "
        "gradients before dividing by the batch size; needs --dp-example-clip", config.non_negative_float)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PsSettings(_Cluster):
    """The parameter server's settings (`comind ps`)."""

    listen: str = _setting("0.0.0.0:2222", "host:port the ps listens on (port 0 picks a free one)", config.address)
    replicas_to_aggregate: int | None = _setting(
        None, "updates that close a round (fewer than the workers leaves backups); unset: all live workers",
        config.positive_int)
    min_updates: int = _setting(1, "updates a round needs to close at its deadline", config.positive_int)
    # Client sampling (comind/sampling.py).
    clients_per_round: int | None = _setting(
        None, "client sampling: each round selects this many of the live workers at random (K) and closes at K "
        "updates; the others wait without training. With worker-level DP, each live worker is selected with "
        "probability K / --num-workers instead (Poisson sampling). With --rounds-mode async: K workers train at "
        "once, each turn that ends passing to one drawn from the others. Unset: every live worker", config.positive_int)
    client_fraction: float | None = _setting(
        None, "client sampling by fraction: K is this fraction of the live workers (rounded down, at least 1), "
        "instead of --clients-per-round", config.fraction_up_to_one)
    over_selection: float = _setting(
        0.0, "with client sampling, each round selects ceil(K (1 + this)) workers and still closes at K updates, "
        "so slow or vanished workers cost no round", config.non_negative_float)
    round_timeout: float = _setting(600.0, "seconds a round waits for stragglers", config.positive_float)
    # Asynchronous rounds (comind/async_rounds.py).
    rounds_mode: str = _setting(
        "sync", "sync: a round closes when its workers' updates, all trained from the same model, are in; async "
        "(FedBuff): no barrier, a worker pushes when done and continues at once from the newest model, a round is "
        "a model version made of --buffer-size updates, each weighted by its staleness", str, config.rounds_modes)
    buffer_size: int | None = _setting(
        None, "async rounds: K, the updates that make a version; unset: half the live workers, at least 1",
        config.positive_int)
    staleness_exponent: float = _setting(
        0.5, "async rounds: a, an update trained from a version tau versions old is scaled by (1 + tau)^-a",
        config.non_negative_float)
    max_staleness: int = _setting(
        10, "async rounds: updates trained from a version more than this many versions old are refused as stale",
        config.non_negative_int)
    lease_seconds: float = _setting(10.0, "seconds a worker stays live without a heartbeat", config.positive_float)
    long_poll_seconds: float = _setting(
        LONG_POLL_SECONDS, "seconds the ps holds a waiting worker's Round call before it answers \"not yet\" and "
        "the worker calls again; longer costs the ps fewer calls per waiting worker (with client sampling, most "
        "are), but must stay under the idle timeout of any proxy between them (nginx: 60 s)", config.positive_float)
    #: Unset, ``examples``; with worker-level DP, ``uniform`` (``ps_main.server_pipeline``).
    weighting: str | None = _setting(None, "how updates are weighted in the average (the mean only); unset: "
                                     "examples, or uniform with worker-level DP (which refuses examples)", str,
                                     config.weightings)
    # The round pipeline's stages (comind/pipeline.py).
    aggregation: str = _setting(
        "mean", "how a round's updates are combined: mean (streamed, memory for one model), or median or "
        "trimmed-mean (coordinate-wise, unweighted; outvote a minority of poisoned updates but hold every update "
        "of a round in memory)", str, config.aggregation_rules)
    trim_fraction: float = _setting(
        0.25, "trimmed-mean drops this fraction of the updates from each end of every coordinate (floor of it "
        "times the updates; a round with too few to trim takes the median)", config.fraction_below_half)
    max_update_norm: float | None = _setting(
        None, "bound on the L2 norm of each update's change from the global model: longer changes are scaled "
        "down to it; unset: no bound", config.positive_float)
    server_optimizer: str | None = _setting(
        None, "how a round's aggregate D changes the global model: fedavg adds it; fedavgm adds it with "
        "momentum; fedadam, fedyogi and fedadagrad take adaptive steps along it (Reddi et al. 2021); unset: fedavg, "
        "or fedadam in distributed mode", str, config.server_optimizers)
    server_learning_rate: float | None = _setting(
        None, "the server optimizer's learning rate eta; unset: 1.0 for fedavg and fedavgm, 0.1 for fedadam and "
        "fedadagrad, 0.01 for fedyogi; in distributed mode sqrt(workers) x 0.001, the original's rule",
        config.positive_float)
    server_momentum: float | None = _setting(None, "fedavgm's momentum; unset: 0.9", config.fraction_below_one)
    server_beta1: float | None = _setting(None, "decay of the first moment (fedadam, fedyogi, fedadagrad); unset: 0.9",
                                          config.fraction_below_one)
    server_beta2: float | None = _setting(
        None, "decay of the second moment (fedadam, fedyogi); unset: 0.99, or Keras's 0.999 in distributed mode",
        config.fraction_below_one)
    server_epsilon: float | None = _setting(
        None, "tau, added to the square root of the second moment (fedadam, fedyogi, fedadagrad): it bounds their "
        "steps; unset: 1e-3, or Keras's 1e-7 in distributed mode", config.positive_float)
    # The encode stage (comind/encodings.py).
    update_encoding: str = _setting(
        "float32", "how workers send their updates' floating-point values, announced when they join: float32 (as "
        "they are), float16 or bfloat16 (half the bytes), int8 (a quarter, plus one float32 scale per 8192 values; "
        "stochastic rounding, unbiased), or topk:FRACTION (each tensor's largest FRACTION of values with their "
        "indices; the worker adds what it did not send to its next update)", config.update_encoding)
    model_encoding: str = _setting(
        "float32", "how the global model goes down to the workers: float32 (at the model's dtype) or float16 (half "
        "the bytes; workers decode it back to the model's dtype)", str, config.model_encodings)
    # Worker-level differential privacy (comind/privacy.py, comind/accountant.py).
    dp_noise_multiplier: float | None = _setting(
        None, "worker-level differential privacy (DP-FedAvg): z, the std of the Gaussian noise added to each round's "
        "sum of clipped updates, over the clip C; needs --dp-clip; unset: no DP", config.non_negative_float)
    dp_clip: float | str | None = _setting(
        None, "worker-level DP's clip C on each update's L2 norm, or adaptive: C follows the --dp-target-quantile of "
        "the norms (Andrew et al. 2021)", config.clip_bound)
    dp_initial_clip: float = _setting(0.1, "adaptive clipping's C in the first round", config.positive_float)
    dp_target_quantile: float = _setting(0.5, "adaptive clipping's gamma: the fraction of updates left unclipped",
                                         config.fraction_between)
    dp_clip_learning_rate: float = _setting(0.2, "adaptive clipping's eta_C: C <- C exp(-eta_C (b - gamma))",
                                            config.positive_float)
    dp_accountant: str = _setting("rdp", "how rounds compose into epsilon: rdp (Renyi DP) or pld (privacy loss "
                                  "distributions, tighter)", str, config.accountants)
    dp_target_epsilon: float | None = _setting(
        None, "the privacy budget: training ends at the last round whose epsilon stays within it; unset: no end "
        "but --rounds", config.positive_float)
    # Secure aggregation (comind/secagg, comind/secure_rounds.py).
    secure_aggregation: bool = _setting(
        False, "secure aggregation (Bonawitz et al. 2017; SecAgg+): workers mask their updates so that the ps learns "
        "only each round's sum; updates count uniformly, --max-update-norm clips on the workers, and median, "
        "trimmed-mean, --replicas-to-aggregate, worker-level DP and update encodings other than float32 are refused",
        config.switch)
    secagg_threshold: float | None = _setting(
        None, "secure aggregation: the fraction of each worker's share holders (itself and its neighbours) needed to "
        "unmask; a round with fewer survivors fails and starts again; unset: the smallest majority",
        config.fraction_above_half)
    secagg_neighbours: int | None = _setting(
        None, "secure aggregation: k, each worker's neighbours (even; SecAgg+'s random k-regular graph); unset: "
        "every other worker in rounds of up to 20, else about 3 log2 n", config.positive_int)
    secagg_clip_range: float = _setting(
        4.0, "secure aggregation: c, the bound on every value of an update, which the fixed-point encoding needs so "
        "that a round's sum never wraps; a worker with a larger value stops with an error", config.positive_float)
    checkpoint_dir: str | None = _setting(None, "directory for durable checkpoints; unset: in memory only")
    keep_checkpoints: int = _setting(3, "checkpoints to keep", config.positive_int)
    max_model_bytes: int = _setting(4 << 30, "largest model the ps accepts", config.positive_int)
    max_concurrent_updates: int = _setting(2, "updates received at once (each holds one model in memory)",
                                           config.positive_int)
    max_examples_per_update: int = _setting(
        10**7, "most training examples an update may claim, its weight in the mean; more is refused. Set it near "
        "the largest worker's data to bound what one worker's claim weighs", config.positive_int)
    max_members: int | None = _setting(
        None, "most live workers at once; registrations are taken at up to this many per lease. Unset: twice "
        "--num-workers, and --num-workers + 16 at least", config.positive_int)
    federated_eval_every: int = _setting(
        0, "federated evaluation: every this many rounds, each worker tests the global model on the examples it "
        "holds out of its shard (--eval-fraction) and reports with its next update; the ps exports the "
        "distribution over the workers; 0: never", config.non_negative_int)
    exit_grace: float = _setting(30.0, "seconds to wait for workers to leave after the last round",
                                 config.positive_float)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerSettings(_Cluster, _Training):
    """A worker's settings (`comind worker`); task 0 is the chief."""

    ps_address: str = _setting("localhost:2222", "host:port of the ps, for workers", config.address)
    task_index: int = _setting(0, "this worker's index; 0 is the chief", config.non_negative_int)
    shard: str = _setting("contiguous", "how the training data is split across workers", str,
                          config.shard_methods)
    dirichlet_alpha: float = _setting(0.5, "concentration of the non-IID split: smaller is more skewed",
                                      config.positive_float)
    eval_fraction: float = _setting(
        0.1, "with federated evaluation on (the ps's --federated-eval-every), the fraction of this worker's shard it "
        "holds out to test the global model on (a seeded draw, at least one example); it trains on the rest",
        config.fraction_between)
    eval_every: int | None = _setting(
        None, "the chief evaluates every this many rounds; unset: about 100 times in all", config.positive_int)
    unreachable_timeout: float = _setting(600.0, "seconds a worker keeps retrying an unreachable ps",
                                          config.positive_float)
    proximal_mu: float = _setting(
        0.0, "FedProx's mu: each local step also minimises mu/2 ||w - x||^2, x the global model this worker last "
        "received, which keeps workers with skewed data near it (Li et al. 2020); 0: FedAvg", config.non_negative_float)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSettings(_Training):
    """`comind train`'s settings: one process, no ps."""

    steps: int | None = _setting(None, "local steps to train (comind train); unset: the data set's preset",
                                 config.positive_int)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LocalSettings:
    """`comind local`'s: the ps's and the workers' settings, and how many workers to start.

    The fields named in :data:`LOCAL_ONLY` keep their defaults here, but for
    ``num_workers``, which is ``workers``, and ``listen``, which is
    :data:`LOCAL_LISTEN`: `comind local` sets them for each process it starts.
    The ps's metrics port and host are every process's: worker ``i`` serves on
    the ps's port plus ``1 + i``.
    """

    ps: PsSettings
    worker: WorkerSettings
    workers: int

    @property
    def log_level(self) -> str:
        return self.ps.log_level


Settings = PsSettings | WorkerSettings | TrainSettings | LocalSettings
_RoleSettings = TypeVar("_RoleSettings", bound=_Common)
_CLASSES: dict[str, tuple[type[PsSettings | WorkerSettings | TrainSettings], ...]] = {
    PS: (PsSettings,), WORKER: (WorkerSettings,), TRAIN: (TrainSettings,), LOCAL: (PsSettings, WorkerSettings)}

#: For `comind run` and `comind health`, which take the role from the environment.
ROLE = config.Option("role", None, "ps or worker (for `comind run`; else from TF_CONFIG or --job_name)", str,
                     (PS, WORKER))


def options_of(cls: type) -> tuple[config.Option, ...]:
    """The options of a settings class, one per field, in field order."""
    return tuple(dataclasses.replace(f.metadata[_OPTION], name=f.name) for f in dataclasses.fields(cls))


def options_for(*roles: str) -> tuple[config.Option, ...]:
    """The options of these roles (ps, worker, train, local), each once; `local`'s lack :data:`LOCAL_ONLY`."""
    options = {o.name: o for role in roles for cls in _CLASSES[role] for o in options_of(cls)}
    leave_out = LOCAL_ONLY if LOCAL in roles else frozenset()
    return tuple(o for name, o in options.items() if name not in leave_out)


def _declared_once(*classes: type) -> None:
    """Raises if two classes declare a field of the same name (rather than share one from a base class)."""
    declared: dict[str, object] = {}
    for cls in classes:
        for field in dataclasses.fields(cls):
            if declared.setdefault(field.name, field.metadata[_OPTION]) is not field.metadata[_OPTION]:
                raise TypeError(f"The setting {field.name!r} is declared twice; declare it once, in a base class "
                                f"of the roles that share it. Received: {cls.__name__}.{field.name}")


_declared_once(PsSettings, WorkerSettings, TrainSettings)
#: Every option, once: the role's, and every field's of a role.
OPTIONS = (ROLE, *options_for(PS, WORKER, TRAIN))


class _Sources:
    """The values given: flags (the new ones over the original tutorials' ones), variables, TF_CONFIG."""

    def __init__(self, flags: Mapping[str, Any], environ: Mapping[str, str]):
        self.cluster: Mapping[str, Any] = \
            cluster_spec.from_tf_config(environ["TF_CONFIG"]) if environ.get("TF_CONFIG") else {}
        original = cluster_spec.from_original_flags(*(flags.get(f"original_{f}") for f in
                                                       ("job_name", "task_index", "ps_hosts", "worker_hosts")))
        # The original flags are flags: they win over variables, but not over the new flags.
        self.flags = {**original, **{name: value for name, value in flags.items() if value is not None}}
        self.environ = environ

    def value(self, option: config.Option) -> Any:
        """The option's value: its flag, else its variable, else TF_CONFIG's, else its default.

        Raises:
            ValueError: a value that does not parse, naming where it came from.
        """
        if self.flags.get(option.name) is not None:
            return option.convert(self.flags[option.name], option.flag)
        if self.environ.get(option.env, "") != "":
            return option.convert(self.environ[option.env], option.env)
        if option.name in self.cluster:
            return option.convert(self.cluster[option.name], "TF_CONFIG")
        return option.default

    def build(self, cls: type[_RoleSettings], fixed: Mapping[str, Any] | None = None) -> _RoleSettings:
        """``cls`` from these values; ``fixed`` names values to take instead."""
        fixed = fixed or {}
        values = {o.name: fixed[o.name] if o.name in fixed else self.value(o) for o in options_of(cls)}
        if "rounds" in values and values["rounds"] is None:
            # In distributed mode a round is one step.
            interval = 1 if values.get("mode") == modes.DISTRIBUTED else values["interval_steps"]
            values["rounds"] = presets.default_rounds(values["dataset"], interval)
        if "metrics_port" in values:
            values |= _metrics_defaults(values)
        return cls(**values)


def _metrics_defaults(values: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics port and host where unset: see :class:`_Cluster`."""
    port, host = values["metrics_port"], values["metrics_host"]
    if port is None:
        task = values.get("task_index")
        port = PS_METRICS_PORT if task is None else PS_METRICS_PORT + 1 + task
        if port > 65535:
            raise ValueError(f"Worker {task} has no default metrics port (it would be {port}); set "
                             f"COMIND_METRICS_PORT. Received: task_index={task}")
    if host is None:
        listen = values.get("listen")
        host = "0.0.0.0" if listen is None else listen.rpartition(":")[0].strip("[]")
    return {"metrics_port": port, "metrics_host": host}


def role_from(flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The role `comind run` takes: ``--role``, ``COMIND_ROLE``, TF_CONFIG's task or ``--job_name``; or None.

    Raises:
        ValueError: a value that does not parse, naming where it came from.
    """
    value: str | None = _Sources(flags or {}, environ or {}).value(ROLE)
    return value


@overload
def load(role: Literal["ps"], flags: Mapping[str, Any] | None = None,
         environ: Mapping[str, str] | None = None) -> PsSettings: ...


@overload
def load(role: Literal["worker"], flags: Mapping[str, Any] | None = None,
         environ: Mapping[str, str] | None = None) -> WorkerSettings: ...


@overload
def load(role: Literal["train"], flags: Mapping[str, Any] | None = None,
         environ: Mapping[str, str] | None = None) -> TrainSettings: ...


@overload
def load(role: Literal["local"], flags: Mapping[str, Any] | None = None,
         environ: Mapping[str, str] | None = None) -> LocalSettings: ...


@overload
def load(role: str, flags: Mapping[str, Any] | None = None,
         environ: Mapping[str, str] | None = None) -> Settings: ...


def load(role: str, flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """A role's settings (``ps``, ``worker``, ``train`` or ``local``) from flags and variables.

    Args:
        role: whose settings; ``local`` gives the ps's and the workers' (see :class:`LocalSettings`).
        flags: values given as flags, by setting name (``vars()`` of the parsed command line); None or
            absent: not given. ``original_job_name``, ``original_task_index``, ``original_ps_hosts`` and
            ``original_worker_hosts`` are the original tutorials' flags; ``workers`` is `comind local`'s.
        environ: the ``COMIND_*`` variables and ``TF_CONFIG`` (``os.environ``); others are ignored.

    Raises:
        ValueError: a value that does not parse, naming where it came from (``--rounds``,
            ``COMIND_ROUNDS`` or ``TF_CONFIG``) and what it should be.
    """
    sources = _Sources(flags or {}, environ or {})
    if role == LOCAL:
        workers = sources.flags.get("workers", LOCAL_WORKERS)
        if workers < 1:
            raise ValueError(f"--workers must be at least 1. Received: --workers={workers}")
        fixed = {o.name: o.default for o in options_for(PS, WORKER) if o.name in LOCAL_ONLY} | \
            {"num_workers": workers, "listen": LOCAL_LISTEN}
        return LocalSettings(ps=sources.build(PsSettings, fixed), worker=sources.build(WorkerSettings, fixed),
                             workers=workers)
    if role not in _CLASSES:
        raise ValueError(f"There are settings for {', '.join(_CLASSES)}. Received: role={role!r}")
    return sources.build(_CLASSES[role][0])


def variables(settings: PsSettings | WorkerSettings | TrainSettings,
              leave_out: frozenset[str] = frozenset()) -> dict[str, str]:
    """The ``COMIND_*`` variables that give these settings back (unset ones left out), for a child process."""
    values = {o.env: getattr(settings, o.name) for o in options_of(type(settings)) if o.name not in leave_out}
    return {env: str(value) for env, value in values.items() if value is not None}
