"""coMind's basic classifier trained with Flower's FedAvg, for bench/flower.py."""
