"""Hypothesis profiles and hostile-input strategies shared by the fuzz tests.

Profiles: ``ci`` (the default) is bounded so that the fuzz tests take well
under a minute on two cores, and replays the same examples every run;
``long`` (``HYPOTHESIS_PROFILE=long``, what ``scripts/fuzz`` runs) explores
``FUZZ_EXAMPLES`` fresh examples per test and keeps what failed in
``.hypothesis/`` to replay first next time.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from comind.proto import comind_pb2 as pb
from comind.tensors import ALLOWED_DTYPES

settings.register_profile(
    "ci", max_examples=60, deadline=5000, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "long", max_examples=int(os.environ.get("FUZZ_EXAMPLES", "5000")), deadline=20000, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

INT64 = st.integers(-(1 << 63), (1 << 63) - 1)

#: Dtype names a peer may send: the allowed ones, near misses, and anything.
DTYPE_NAMES = st.one_of(
    st.sampled_from(sorted(ALLOWED_DTYPES)),
    st.sampled_from(["object", "O", "float32 ", "Float32", ">f4", "<f4", "=f8", "f4", "V8", "S0", "U4", "void",
                     "complex64", "float128", "longdouble", "datetime64[s]", "[('a', '<f4')]", "(2,)f4", ""]),
    st.text(max_size=12),
)

#: Dimensions: small real ones, and the ones that break arithmetic.
DIMS = st.one_of(st.integers(0, 6), INT64,
                 st.sampled_from([-1, 1 << 31, 1 << 32, 1 << 61, 1 << 62, (1 << 63) - 1]))

#: Names: short text of any script, or thousands of characters.
NAMES = st.one_of(st.text(max_size=20), st.text(min_size=1, max_size=3).map(lambda text: text * 400))

TENSOR_SPECS = st.builds(pb.TensorSpec, name=NAMES, dtype=DTYPE_NAMES, shape=st.lists(DIMS, max_size=40))
