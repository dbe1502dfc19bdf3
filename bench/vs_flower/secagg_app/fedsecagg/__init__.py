"""bench/secagg.py's task with Flower's SecAgg+ workflow, for bench/secagg_flower.py."""
