"""Instruments secure aggregation in the ps and worker processes of tests/test_secagg_cluster.py.

Python imports this module at start in every process whose PYTHONPATH begins with this folder. With
``COMIND_TEST_SECAGG_RECORD`` naming a folder, it records there, as .npy files, every worker's encoded update before
masking (``encoded-*``), every masked input the ps takes (``masked-*``), anything the ps decodes or folds into a
plain aggregate (``plain-*``: there must be none), and how many masked inputs the ps is receiving at once as each
starts (``receiving-*``; each is held a tenth of a second longer, so that inputs that could overlap do). With
``COMIND_TEST_SECAGG_KILL=STAGE:ROUND``, a worker SIGKILLs itself when the ps's message for that stage of that round
arrives (share: the roster; masked_input: its inbox; unmask: the unmask request), before it answers; with
``COMIND_TEST_SECAGG_PAUSE=STAGE:ROUND:SECONDS`` it waits that long there instead.
"""

import os

_FOLDER = os.environ.get("COMIND_TEST_SECAGG_RECORD")
_KILL = os.environ.get("COMIND_TEST_SECAGG_KILL")
_PAUSE = os.environ.get("COMIND_TEST_SECAGG_PAUSE")

if _FOLDER or _KILL or _PAUSE:
    import asyncio
    import functools
    import itertools
    import signal
    import time

    import numpy as np

    from comind import aggregation, ps, secure_calls
    from comind.secagg import client, fixed_point, server

    _count = itertools.count()

    def _record(kind, array):
        np.save(os.path.join(_FOLDER, f"{kind}-{os.getpid()}-{next(_count)}.npy"), np.asarray(array))

    def _spy(owner, name, kind, pick):
        original = getattr(owner, name)

        @functools.wraps(original)
        def spied(*args, **kwargs):
            result = original(*args, **kwargs)
            _record(kind, pick(args, result))
            return result
        setattr(owner, name, spied)

    if _FOLDER:
        _spy(fixed_point, "encode", "encoded", lambda args, result: result)
        _spy(server.SecAggServer, "masked_input", "masked", lambda args, result: args[3])
        _spy(ps.ParameterServer, "_decode", "plain", lambda args, result: result)
        _spy(aggregation.RunningWeightedSum, "add", "plain",
             lambda args, result: np.concatenate([np.ravel(t) for t in args[1]]))
        _receiving = [0]
        _original_masked_input = secure_calls._masked_input

        async def _held_masked_input(*args):
            _receiving[0] += 1
            _record("receiving", _receiving[0])
            try:
                await asyncio.sleep(0.1)
                return await _original_masked_input(*args)
            finally:
                _receiving[0] -= 1
        secure_calls._masked_input = _held_masked_input

    def _intercept(stage, round, act):
        name = {"share": "share_keys", "masked_input": "mask", "unmask": "unmask"}[stage]
        original = getattr(client.SecAggClient, name)

        @functools.wraps(original)
        def intercepted(self, *args, **kwargs):
            if self.round == int(round):
                act()
            return original(self, *args, **kwargs)
        setattr(client.SecAggClient, name, intercepted)

    if _KILL:
        _stage, _round = _KILL.split(":")
        _intercept(_stage, _round, lambda: os.kill(os.getpid(), signal.SIGKILL))

    if _PAUSE:
        _stage, _round, _seconds = _PAUSE.split(":")
        _intercept(_stage, _round, lambda: time.sleep(float(_seconds)))
