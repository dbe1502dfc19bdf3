"""coMind against Flower on one machine: the parts of bench/flower.py (a training task) and bench/secagg_flower.py
(secure aggregation)."""
