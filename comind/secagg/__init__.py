"""Secure aggregation: the ps learns only the sum of a round's updates (Bonawitz et al. 2017, "Practical
Secure Aggregation for Privacy-Preserving Machine Learning"; SecAgg+, Bell et al. 2020).

* ``fixed_point``: updates as integers modulo 2^32, stochastically rounded, in a range whose sum never wraps;
* ``graph``: who masks with whom (complete, or SecAgg+'s random k-regular graph);
* ``primitives``: X25519, HKDF, ChaCha20-Poly1305, the ChaCha20 mask PRG, Shamir shares;
* ``client`` and ``server``: the four stages (advertise keys, share keys, masked input, unmask) on each side;
* ``errors``: what either side refuses, and a round that cannot be unmasked.
"""
