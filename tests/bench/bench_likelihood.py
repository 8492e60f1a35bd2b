"""The importance-weighted log-likelihood estimate in float32 and in bfloat16: speed, peak memory
and how far the estimate moves (not a test: run it by hand).

    .venv/bin/python tests/bench/bench_likelihood.py RESULTS_DIR [RESULTS_DIR ...]
        [--test-size 1000] [--k 100 500] [--decoder-mb 128 512]

Each RESULTS_DIR holds a trained run (model.keras and metrics.json, from vae.py or conv_vae.py).
For each, and each K, the estimate runs twice with the same weights and the same noise, its
decoder built in float32 and in mixed_bfloat16, each in its own process (so each peak resident
memory is its own), and prints the mean log-likelihood, seconds, peak memory and the difference.
Targets: bfloat16 within 0.05 nats of float32; peak memory under 3 GB. With --decoder-mb, each
estimate runs once per bound on the decoder's activations per call (vae.IW_DECODER_MEMORY), the
bounds alternated twice, and the best time of each is printed, with its arithmetic rate as a share
of the matmul peak (bench_training.py's FLOP count and peak).
"""

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# Options that runs older than them did not record, at their defaults.
CONFIG_DEFAULTS = {"beta": 1.0, "kl_warmup_epochs": 0, "activation": "relu", "hidden_layers": 1,
                   "dense_units": 32, "dense_layers": 1, "dataset": "mnist", "conditional": False}


def estimate(results_dir, policy, num_samples, test_size, data, decoder_mb=None):
    """One estimate in this process: mean log-likelihood, seconds, peak resident MB, GFLOP."""
    import numpy as np

    import conv_vae
    import fid
    import vae
    from bench_training import likelihood_gflop

    metrics = json.loads((results_dir / "metrics.json").read_text())
    config = argparse.Namespace(**{**CONFIG_DEFAULTS, **metrics["config"], "dtype_policy": policy})
    architecture = conv_vae.CONV if metrics["model"] == conv_vae.CONV.title else vae.DENSE
    _, _, x_test, y_test = vae.load_dataset(data, config.dataset)
    x_test = vae.to_float_images(x_test[:test_size])
    model = vae.build_model(config, architecture, x_test.shape[1:])
    condition = vae.one_hot(y_test[:test_size], model.classes) if model.classes else None
    model((x_test[:1], condition[:1]) if model.classes else x_test[:1])
    model.set_weights(fid.load_model(results_dir / "model.keras").get_weights())
    start = time.perf_counter()
    log_likelihood = vae.importance_weighted_log_likelihood(
        model, x_test, num_samples, seed=0, xla=architecture.xla, verbose=False,
        decoder_memory=vae.IW_DECODER_MEMORY if decoder_mb is None else decoder_mb * 2**20,
        condition=condition)
    return {"mean": float(np.mean(log_likelihood)), "seconds": time.perf_counter() - start,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "gflop": likelihood_gflop(model.encoder, model.decoder, len(x_test), num_samples)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dirs", nargs="+", type=Path)
    parser.add_argument("--data", default=os.environ.get("MNIST_NPZ")
                        or str(Path.home() / ".keras" / "datasets" / "mnist.npz"))
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--k", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--decoder-mb", type=int, nargs="+",
                        help="bounds on the decoder's activations per call to time, in MB")
    parser.add_argument("--case", nargs=2, metavar=("POLICY", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # one estimate, at the one --decoder-mb given, if any
        print(json.dumps(estimate(args.results_dirs[0], args.case[0], int(args.case[1]),
                                  args.test_size, args.data,
                                  args.decoder_mb[0] if args.decoder_mb else None)))
        return
    import vae  # here: the --case processes import it themselves

    machine = vae.machine_record()
    print(f"CPU: {machine['cpu']}, {machine['cores']} cores, {machine['isa']}, "
          f"ONEDNN_MAX_CPU_ISA={machine['onednn_max_cpu_isa'] or 'unset'}; command: "
          f"{shlex.join(['python', *sys.argv])}", flush=True)
    if args.decoder_mb:
        time_decoder_bounds(args)
        return
    for results_dir in args.results_dirs:
        model = json.loads((results_dir / "metrics.json").read_text())
        print(f"\n{results_dir} ({model['model']}, trained in "
              f"{model['config'].get('dtype_policy', 'float32')}), {args.test_size} test images:")
        for num_samples in args.k:
            results = {}
            for policy in ("float32", "mixed_bfloat16"):
                result = results[policy] = case(args, results_dir, policy, num_samples)
                print(f"  K={num_samples:<5d} {policy:15s} log-likelihood {result['mean']:.4f} "
                      f"nats, {result['seconds']:.1f} s, peak memory {result['peak_mb']:,.0f} MB "
                      f"(target < 3,000: {'met' if result['peak_mb'] < 3000 else 'NOT met'})")
            difference = results["mixed_bfloat16"]["mean"] - results["float32"]["mean"]
            speed_up = results["float32"]["seconds"] / results["mixed_bfloat16"]["seconds"]
            print(f"  K={num_samples:<5d} bfloat16 - float32: {difference:+.4f} nats (target "
                  f"within 0.05: {'met' if abs(difference) <= 0.05 else 'NOT met'}), speed-up "
                  f"{speed_up:.2f}x")


def case(args, results_dir, policy, num_samples, decoder_mb=None):
    """One estimate in its own process (so each peak resident memory is its own), at the
    decoder_mb bound or vae.IW_DECODER_MEMORY."""
    bound = [] if decoder_mb is None else ["--decoder-mb", str(decoder_mb)]
    output = subprocess.run(
        [sys.executable, __file__, str(results_dir), "--case", policy, str(num_samples), *bound,
         "--test-size", str(args.test_size), "--data", args.data],
        capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def time_decoder_bounds(args):
    """Seconds of each estimate at each --decoder-mb bound, float32 and bfloat16."""
    from bench_training import matmul_peak_gflops

    peaks = {"float32": matmul_peak_gflops("float32"),
             "mixed_bfloat16": matmul_peak_gflops("bfloat16")}
    print(f"matmul peak: {peaks['float32']:.0f} GFLOP/s float32, "
          f"{peaks['mixed_bfloat16']:.0f} bfloat16")
    for results_dir in args.results_dirs:
        for num_samples in args.k:
            for policy in ("float32", "mixed_bfloat16"):
                seconds, means = {}, {}
                for _ in range(2):
                    for decoder_mb in args.decoder_mb:
                        result = case(args, results_dir, policy, num_samples, decoder_mb)
                        seconds.setdefault(decoder_mb, []).append(result["seconds"])
                        means.setdefault(decoder_mb, set()).add(result["mean"])
                gflop = result["gflop"]  # the same at every bound
                rates = {mb: gflop / min(seconds[mb]) for mb in args.decoder_mb}
                print(f"{results_dir}, K={num_samples}, {args.test_size} test images, {policy}: "
                      + ", ".join(f"{mb} MB {min(seconds[mb]):.2f} s, {rates[mb]:.0f} GFLOP/s "
                                  f"({rates[mb] / peaks[policy]:.1%} of the peak), log-likelihood "
                                  f"{' / '.join(f'{m:.10f}' for m in sorted(means[mb]))}"
                                  for mb in args.decoder_mb))


if __name__ == "__main__":
    main()
