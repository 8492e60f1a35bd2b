"""Training speed benchmark (issue: train near this machine's limit without changing what is learned).

    .venv/bin/python tests/bench_training.py [--data ../shared/data/mnist.npz] [--epochs 3] [--skip-end-to-end]

Not collected by pytest (its name does not start with test_). For each model it trains a few full
epochs with the fast path (the default) and with the plain path (`--plain`: arrays into fit, one
step per call, no XLA), each in its own process, and prints the median seconds per epoch after
the first (the first holds tracing and compilation, printed apart), the ratio, the arithmetic rate
and the peak resident memory. Then it times the whole default dense run end to end. Run it with
nothing else on the machine: both paths share its two cores.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import conv_vae  # noqa: E402
import vae  # noqa: E402

TRAIN_IMAGES, TEST_IMAGES = 60000, 10000


def layer_flops(layer):
    """Multiply-adds x 2 of one forward pass of one image through a Dense or convolution layer."""
    kind = layer.__class__.__name__
    if kind == "Dense":
        return 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
    if kind == "Conv2D":
        height, width = layer.output.shape[1:3]
        return 2 * height * width * np.prod(layer.kernel.shape)
    if kind == "Conv2DTranspose":
        height, width = layer.input.shape[1:3]
        return 2 * height * width * np.prod(layer.kernel.shape)
    return 0


def epoch_gflop(encoder, decoder):
    """Training costs about 3 forward passes (forward, and backward for inputs and weights);
    the test set is one forward pass."""
    forward = sum(layer_flops(layer) for model in (encoder, decoder) for layer in model.layers)
    return (3 * forward * TRAIN_IMAGES + forward * TEST_IMAGES) / 1e9


def timed_run(script, data, epochs, extra):
    """One training run in its own process: (seconds per epoch list, peak resident MB, wall seconds)."""
    with tempfile.TemporaryDirectory() as results_dir:
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        start = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / script), "--data", data, "--results-dir", results_dir,
                        "--epochs", str(epochs), "--fid", "none", "--iw-samples", "0", *extra],
                       cwd=ROOT, check=True, capture_output=True)
        wall = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        seconds = json.loads((Path(results_dir) / "metrics.json").read_text())["seconds_per_epoch"]
        history = (Path(results_dir) / "history.csv").read_text().splitlines()
    val_loss = float(history[-1].split(",")[history[0].split(",").index("val_loss")])
    return seconds, max(peak, before) / 1024, wall, val_loss


def benchmark_model(name, script, encoder, decoder, data, epochs):
    gflop = epoch_gflop(encoder, decoder)
    print(f"\n{name}: {gflop:.0f} GFLOP per epoch (60,000 training steps' worth of images, 3 passes; test set, 1 pass)")
    results = {}
    for path, extra in (("fast", []), ("plain", ["--plain"])):
        seconds, peak_mb, wall, val_loss = timed_run(script, data, epochs, extra)
        steady = float(np.median(seconds[1:]))
        results[path] = steady
        print(f"  {path:5s}: {steady:6.2f} s/epoch (first epoch {seconds[0]:.2f} s, so ~{seconds[0] - steady:.1f} s "
              f"of tracing/compilation), {gflop / steady:5.1f} GFLOP/s, peak memory {peak_mb:,.0f} MB, "
              f"test loss after {epochs} epochs {val_loss:.3f}")
    ratio = results["plain"] / results["fast"]
    print(f"  speed-up of the fast path: {ratio:.2f}x")
    return results, ratio


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist.npz"))
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed run (the first is excluded)")
    parser.add_argument("--skip-end-to-end", action="store_true")
    args = parser.parse_args()
    defaults = argparse.Namespace(latent_dim=2, hidden_dim=256, filters=32, dropout=0.25)

    _, dense_ratio = benchmark_model("Dense VAE (batch 64)", "vae.py", vae.dense_encoder(defaults),
                                     vae.dense_decoder(defaults), args.data, args.epochs)
    conv, conv_ratio = benchmark_model("Convolutional VAE (batch 128)", "conv_vae.py", conv_vae.conv_encoder(defaults),
                                       conv_vae.conv_decoder(defaults), args.data, args.epochs)
    print("\ntargets:")
    print(f"  dense fast path >= 3x plain: {dense_ratio:.2f}x -> {'met' if dense_ratio >= 3 else 'NOT met'}")
    print(f"  conv fast path >= 2x plain: {conv_ratio:.2f}x ({conv['fast']:.1f} s/epoch) -> "
          f"{'met' if conv_ratio >= 2 else 'NOT met'}")
    if not args.skip_end_to_end:
        with tempfile.TemporaryDirectory() as results_dir:
            start = time.perf_counter()
            subprocess.run([sys.executable, str(ROOT / "vae.py"), "--latent-dim", "2", "--epochs", "30", "--fid",
                            "pixel", "--iw-samples", "0", "--data", args.data, "--results-dir", results_dir],
                           cwd=ROOT, check=True, capture_output=True)
            wall = time.perf_counter() - start
        print(f"  python vae.py --latent-dim 2 --epochs 30 --fid pixel --iw-samples 0, end to end: {wall:.0f} s "
              f"(target < 120 s) -> {'met' if wall < 120 else 'NOT met'}")
        print("  (the importance-weighted estimate, on by default with K=5000, comes on top: "
              "its time is iw_seconds in metrics.json)")


if __name__ == "__main__":
    main()
