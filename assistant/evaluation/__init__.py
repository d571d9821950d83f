"""What measures the product: the latency benchmark, the naive baseline, turn-taking scenarios, plots."""
