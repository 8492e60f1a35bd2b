"""Benchmark of KID and precision / recall / density / coverage (fid.py) at a run's sizes.

    .venv/bin/python tests/bench/bench_metrics.py [--sizes 10000,50000] [--dim 128]

Not collected by pytest. What a run adds to its evaluation per feature kind: the test set against
its reconstructions, then against its samples, as vae.fids does it; then the peak memory of the
k-NN metrics (NumPy's allocations, traced by tracemalloc) at each size, which the
row blocks keep at block_size x N instead of N x N. Features are random ReLU vectors of the
classifier's width (128): the cost depends on the sizes only.
"""

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import fid  # noqa: E402


def relu_features(count, dim, shift, seed):
    return np.maximum(np.random.default_rng(seed).normal(shift, 1, (count, dim)), 0)


def run_metrics(real, fakes):
    """KID and the k-NN metrics of each fake set against real: seconds of each part."""
    seconds = {"kid": 0.0, "prdc": 0.0}
    for fake in fakes:
        start = time.perf_counter()
        fid.kernel_distance(real, fake)
        seconds["kid"] += time.perf_counter() - start
        start = time.perf_counter()
        fid.precision_recall_density_coverage(real, fake)
        seconds["prdc"] += time.perf_counter() - start
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,50000",
                        help="images per set; the first is timed both ways, each is memory-traced")
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]

    count = sizes[0]
    real = relu_features(count, args.dim, 0.0, 0)
    fakes = [relu_features(count, args.dim, shift, seed) for seed, shift in ((1, 0.1), (2, 0.3))]
    print(f"KID and k-NN metrics, {count:,} test vs {count:,} reconstructions and {count:,} "
          f"samples, {args.dim}-d features:")
    seconds = run_metrics(real, fakes)
    print(f"  KID {seconds['kid']:6.2f} s   k-NN {seconds['prdc']:6.2f} s   "
          f"total {sum(seconds.values()):6.2f} s")

    print("peak memory of precision_recall_density_coverage (block_size 1000):")
    for count in sizes:
        real = relu_features(count, args.dim, 0.0, 0)
        fake = relu_features(count, args.dim, 0.3, 2)
        inputs = real.nbytes + fake.nbytes
        tracemalloc.start()
        start = time.perf_counter()
        fid.precision_recall_density_coverage(real, fake)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        full_matrix = count * count * 8
        print(f"  {count:>6,} vs {count:,}: {elapsed:7.1f} s, peak {peak / 2**20:7.0f} MiB above "
              f"the inputs' {inputs / 2**20:.0f} MiB (a full N x N float64 matrix: "
              f"{full_matrix / 2**20:,.0f} MiB)")


if __name__ == "__main__":
    main()
