"""Which examples each worker trains on.

Every worker calls :func:`shard` with the same labels, number of shards and
seed, and gets its own part: the parts of all workers are disjoint and
together cover the dataset, with no coordination beyond the shared seed.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

METHODS = ("contiguous", "iid", "dirichlet", "none")

# A Dirichlet split is redrawn while some shard comes out empty; this bounds
# the redraws so that a hopeless alpha fails quickly instead of looping.
MAX_DIRICHLET_DRAWS = 100


def shard(labels: np.ndarray, num_shards: int, index: int, method: str = "contiguous", alpha: float = 0.5,
          seed: int = 0) -> np.ndarray:
    """The indices of the examples in shard ``index`` of ``num_shards``.

    Methods:
        ``contiguous``: consecutive blocks, ``np.array_split(range(N))``, as
            the original tutorials split their data.
        ``iid``: a seeded random permutation, split into near-equal parts.
        ``dirichlet``: the usual non-IID split: for each class, the shares of
            the shards are drawn from Dirichlet(``alpha``). Small ``alpha``
            gives each shard few classes; large ``alpha`` approaches ``iid``.
            Redrawn (at most :data:`MAX_DIRICHLET_DRAWS` times) while some
            shard would be empty.
        ``none``: every example, for a worker that holds its own data.

    The indices come back in increasing order for every method (training
    shuffles anyway, and ordered indices read memory in order). The random
    methods draw from ``np.random.default_rng(seed)``, so workers with the
    same seed and the same NumPy version compute the same partition.

    Args:
        labels: one integer label per example, shape ``(N,)``.
        num_shards: how many parts to split into, at least 1.
        index: which part to return, ``0 <= index < num_shards``.
        method: one of :data:`METHODS`.
        alpha: the Dirichlet concentration, > 0; used by ``dirichlet`` only.
        seed: the seed every worker must share; used by ``iid`` and ``dirichlet``.

    Returns:
        A sorted integer array of indices into ``labels``.

    Raises:
        ValueError: an argument is invalid, there are fewer examples than
            shards, or ``alpha`` is too small to give every shard an example.
    """
    labels = np.asarray(labels)
    _validate(labels, num_shards, index, method, alpha)
    if method == "none":
        return np.arange(len(labels))
    if method == "contiguous":
        return np.array_split(np.arange(len(labels)), num_shards)[index]
    rng = np.random.default_rng(seed)
    if method == "iid":
        parts = np.array_split(rng.permutation(len(labels)), num_shards)
    else:
        parts = _dirichlet_parts(labels, num_shards, alpha, rng)
    return np.sort(parts[index])


def _validate(labels: np.ndarray, num_shards: int, index: int, method: str, alpha: float) -> None:
    if method not in METHODS:
        raise ValueError(f"Unknown sharding method. Expected one of {', '.join(map(repr, METHODS))}. "
                         f"Received: method={method!r}")
    if labels.ndim != 1:
        raise ValueError(f"labels must have one label per example, shape (N,). Received: labels.shape={labels.shape}")
    if not _is_int(num_shards) or num_shards < 1:
        raise ValueError(f"num_shards must be an integer >= 1. Received: num_shards={num_shards!r}")
    if not _is_int(index) or not 0 <= index < num_shards:
        raise ValueError(f"index must be an integer with 0 <= index < num_shards={num_shards}. "
                         f"Received: index={index!r}")
    if not (isinstance(alpha, numbers.Real) and alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a positive finite number. Received: alpha={alpha!r}")
    if method != "none" and len(labels) < num_shards:
        raise ValueError(f"Cannot split {len(labels)} examples into {num_shards} non-empty shards. "
                         f"Received: num_shards={num_shards}")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _dirichlet_parts(labels: np.ndarray, num_shards: int, alpha: float,
                     rng: np.random.Generator) -> list[np.ndarray]:
    """All shards of a Dirichlet split, none of them empty."""
    # Shuffle within each class once, so that which examples of a class a
    # shard gets is random too, not just how many.
    by_class = [rng.permutation(np.flatnonzero(labels == label)) for label in np.unique(labels)]
    for _ in range(MAX_DIRICHLET_DRAWS):
        pieces = [_split_by_shares(members, rng.dirichlet(np.full(num_shards, alpha))) for members in by_class]
        parts = [np.concatenate(shard_pieces) for shard_pieces in zip(*pieces, strict=True)]
        if all(len(part) for part in parts):
            return parts
    raise ValueError(f"alpha={alpha} is too small for {num_shards} shards: {MAX_DIRICHLET_DRAWS} Dirichlet "
                     "draws all left some shard without examples. Use a larger alpha or fewer shards. "
                     f"Received: alpha={alpha}")


def _split_by_shares(members: np.ndarray, shares: np.ndarray) -> list[np.ndarray]:
    """``members`` cut into ``len(shares)`` consecutive pieces sized by ``shares`` (which sum to 1)."""
    cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
    return np.split(members, cuts)


def hold_out(indices: np.ndarray, fraction: float, seed: int = 0, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A worker's shard split into the examples it trains on and those it tests the global model on.

    Federated evaluation (:mod:`comind.federated_eval`) tests the global model on data each worker holds and
    never trains on: ``ceil(fraction * len(indices))`` of its examples, at least one, drawn by
    ``np.random.default_rng([seed, index])`` (so a restarted worker holds out the same ones), and at least one left to
    train on. Drawn from the shard, the held-out examples follow its class mix: on non-IID shards, each
    worker's figures say how the global model serves that worker's data.

    Args:
        indices: the shard, as :func:`shard` gives it.
        fraction: the share held out, ``0 < fraction < 1``.
        seed: the draw's seed, the one every worker shares.
        index: the shard's index: each worker draws its own.

    Returns:
        The indices to train on and those held out, each sorted.

    Raises:
        ValueError: a fraction outside (0, 1), or a shard of fewer than two examples.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"The fraction held out is between 0 and 1, exclusive. Received: fraction={fraction!r}")
    if len(indices) < 2:
        raise ValueError(f"Holding examples out for federated evaluation needs a shard of two examples at least, "
                         f"one to train on and one to test; use fewer workers or more data. Received: "
                         f"{len(indices)} examples")
    count = min(len(indices) - 1, math.ceil(fraction * len(indices)))
    order = np.random.default_rng([seed, index]).permutation(len(indices))
    return np.sort(indices[order[count:]]), np.sort(indices[order[:count]])
