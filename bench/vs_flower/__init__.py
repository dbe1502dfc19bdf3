"""coMind against Flower on one task and one machine: the parts of bench/flower.py."""
