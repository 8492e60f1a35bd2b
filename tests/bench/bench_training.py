"""Training speed benchmark: fast path in float32 and in mixed_bfloat16, against the plain path.

    .venv/bin/python tests/bench/bench_training.py [--data mnist.npz] [--epochs 3]
        [--policies float32,mixed_bfloat16] [--skip-end-to-end]

Not collected by pytest (its name does not start with test_). For each model it trains a few full
epochs with the fast path (the default) under each dtype policy and with the plain path
(`--plain`: arrays into fit, one step per call, no XLA, Keras' own dropout, float32), each in its
own process, and prints the median seconds per epoch after the first (the first holds tracing and
compilation, printed apart), the ratios, the arithmetic rate and the peak resident memory, and
the floor: the train step alone, looped over in-memory batches inside one compiled program; then
a per-layer profile of one training step in each policy, against the machine's matmul ceiling,
and what the progress frame (progress.gif) adds to each epoch; then it times
`python vae.py --latent-dim 2 --epochs 30 --fid pixel` end to end.
Run it with nothing else on the machine: the runs share its cores.
"""

import argparse
import json
import math
import subprocess
import os
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import conv_vae  # noqa: E402
import fid  # noqa: E402
import vae  # noqa: E402

TRAIN_IMAGES, TEST_IMAGES = 60000, 10000
# Both scripts' network options at their defaults (each builder reads its own).
DEFAULT_OPTIONS = dict(latent_dim=2, hidden_dim=256, hidden_layers=1, activation="relu",
                       filters=32, dense_units=32, dense_layers=1, dropout=0.25, plain=False)


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
    """One training run in its own process: (seconds per epoch, peak resident MB, last test
    loss)."""
    with tempfile.TemporaryDirectory() as results_dir:
        subprocess.run([sys.executable, str(ROOT / script), "--data", data, "--results-dir",
                        results_dir, "--epochs", str(epochs), "--fid", "none", "--iw-samples", "0",
                        *extra],
                       cwd=ROOT, check=True, capture_output=True)
        metrics = json.loads((Path(results_dir) / "metrics.json").read_text())
    return metrics["seconds_per_epoch"], metrics["peak_memory_mb"], metrics["final_test_loss"]


def matmul_peak_gflops(dtype, size=2048, repeats=20):
    """This machine's arithmetic ceiling in dtype, as a large matrix product reaches it."""
    a = tf.cast(tf.random.normal((size, size)), dtype)
    product = tf.function(lambda a: tf.matmul(a, a))
    product(a).numpy()
    start = time.perf_counter()
    for _ in range(repeats):
        product(a).numpy()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def milliseconds_per_call(function, x, repeats):
    tf.nest.map_structure(lambda t: t.numpy(), function(x))
    start = time.perf_counter()
    for _ in range(repeats):
        tf.nest.map_structure(lambda t: t.numpy(), function(x))
    return (time.perf_counter() - start) / repeats * 1000


def profile_layers(name, encoder, decoder, batch_size, xla, repeats=20):
    """Where a training step's time goes: each layer's forward and forward+backward on one batch
    (its input in the dtype the layer before hands it), compiled as the fast path compiles (XLA or
    not), less the cost of calling a compiled function."""
    overhead = milliseconds_per_call(tf.function(lambda x: x + 1.0, jit_compile=xla),
                                     tf.zeros((batch_size, 1)), repeats)
    print(f"\n{name}: profile of one training step, batch {batch_size}, "
          f"{'XLA' if xla else 'TF graph'} (ms per step, less {overhead:.2f} ms per call)")
    print(f"  {'layer':34s} {'output':>18s} {'forward':>9s} {'fwd+bwd':>9s} {'share':>6s} "
          f"{'GFLOP/s':>8s}")
    rows = []
    for model in (encoder, decoder):
        for layer in model.layers[1:]:
            x = tf.cast(tf.random.uniform((batch_size, *layer.input.shape[1:])), layer.input.dtype)
            forward = tf.function(lambda x, layer=layer: layer(x, training=True), jit_compile=xla)

            @tf.function(jit_compile=xla)
            def forward_backward(x, layer=layer):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    y = tf.reduce_sum(tf.cast(layer(x, training=True), tf.float32))
                return tape.gradient(y, [x, *layer.trainable_weights])

            times = [max(milliseconds_per_call(function, x, repeats) - overhead, 0.0)
                     for function in (forward, forward_backward)]
            rows.append((f"{model.name}/{layer.name}", str(tuple(layer.output.shape[1:])), *times,
                         3 * layer_flops(layer) * batch_size / max(times[1] / 1000, 1e-9) / 1e9))
    total = sum(row[3] for row in rows)
    for label, shape, forward_ms, both_ms, gflops in rows:
        print(f"  {label:34s} {shape:>18s} {forward_ms:9.2f} {both_ms:9.2f} "
              f"{both_ms / total:6.0%} {gflops:8.1f}")
    print(f"  {'sum of layers':34s} {'':>18s} {'':>9s} {total:9.2f}   "
          f"(x {TRAIN_IMAGES // batch_size} steps = {total * TRAIN_IMAGES / batch_size / 1000:.1f} "
          "s per epoch of layer arithmetic)")


def training_steps_alone(encoder, decoder, batch_size, xla, data, steps):
    """Seconds per epoch of the train step alone: `steps` batches already in memory, looped inside
    one compiled program (no data pipeline, no Keras loop, no test pass): the floor of the fast
    path."""
    x = vae.to_float_images(vae.load_dataset(data)[0][:steps * batch_size])
    batches = tf.constant(x.reshape(steps, batch_size, *x.shape[1:]))
    model = vae.VAE(encoder, decoder, seed=0)
    model(batches[0])
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.optimizer.build(model.trainable_variables)

    @tf.function(jit_compile=xla)
    def loop(batches):
        for i in tf.range(tf.shape(batches)[0]):
            model.update(batches[i])
        return model.loss_tracker.result()

    loop(batches).numpy()  # traces and compiles for this shape
    start = time.perf_counter()
    loop(batches).numpy()
    return (time.perf_counter() - start) / steps * math.ceil(TRAIN_IMAGES / batch_size)


def progress_frame_seconds(encoder, decoder, data, frames, repeats=20):
    """What vae.TrainingState adds to every epoch for progress.gif: one frame, and the frames file
    rewritten."""
    x_test = vae.to_float_images(vae.load_dataset(data)[2][:10])
    model = vae.VAE(encoder, decoder)
    model(x_test[:1])
    with tempfile.TemporaryDirectory() as results_dir:
        tracker = vae.TrainingState(Path(results_dir), {}, "bench", x_test,
                                    np.zeros((20, 2), np.float32))
        tracker.set_model(model)
        earlier = [tracker.progress_frame()] * frames
        start = time.perf_counter()
        for _ in range(repeats):
            frame = tracker.progress_frame()
            fid.atomic_write(Path(results_dir) / vae.PROGRESS_FRAMES,
                             lambda p: np.save(p, np.stack([*earlier, frame])))
    return (time.perf_counter() - start) / repeats


def build_networks(architecture, image_shape):
    """The architecture's (encoder, decoder) with the default options, in Keras' current dtype
    policy."""
    options = argparse.Namespace(**DEFAULT_OPTIONS)
    return (architecture.build_encoder(options, image_shape),
            architecture.build_decoder(options, image_shape))


def benchmark_model(architecture, image_shape, data, epochs, floor_steps, policies):
    """Timed runs of each policy's fast path and of the plain path; returns seconds per epoch by
    path."""
    name, batch_size, xla = architecture.title, architecture.batch_size, architecture.xla
    gflop = epoch_gflop(*build_networks(architecture, image_shape))
    print(f"\n{name} (batch {batch_size}): {gflop:.0f} GFLOP per epoch (60,000 training steps' "
          "worth of images, 3 passes; test set, 1 pass)")
    results = {}
    paths = [(policy, ["--dtype-policy", policy]) for policy in policies] + [("plain", ["--plain"])]
    for path, extra in paths:
        seconds, peak_mb, val_loss = timed_run(architecture.script, data, epochs, extra)
        steady = float(np.median(seconds[1:]))
        results[path] = steady
        print(f"  {path:14s}: {steady:6.2f} s/epoch (first epoch {seconds[0]:.2f} s, so "
              f"~{seconds[0] - steady:.1f} s of tracing/compilation), {gflop / steady:5.1f} "
              f"GFLOP/s, peak memory {peak_mb:,.0f} MB, test loss after {epochs} epochs "
              f"{val_loss:.3f}")
    for policy in policies:
        print(f"  speed-up of the fast path in {policy} over the plain path: "
              f"{results['plain'] / results[policy]:.2f}x")
        keras.config.set_dtype_policy(policy)
        encoder, decoder = build_networks(architecture, image_shape)
        keras.config.set_dtype_policy("float32")
        floor = training_steps_alone(encoder, decoder, batch_size, xla, data, floor_steps)
        print(f"    floor in {policy}: the train step alone, {floor_steps} in-memory batches in "
              f"one compiled loop: {floor:.2f} s/epoch ({gflop / floor:.1f} GFLOP/s); the fast "
              f"path spends {results[policy] - floor:.2f} s/epoch more (data, Keras' loop, the "
              "test pass)")
    watch_cost = progress_frame_seconds(*build_networks(architecture, image_shape), data,
                                        frames=100)
    print(f"  progress frame per epoch (decode, draw, save 100 frames): "
          f"{1000 * watch_cost:.1f} ms, {watch_cost / results[policies[0]]:.2%} of a "
          f"{policies[0]} epoch (target < 2%)")
    fastest = min(policies, key=results.get)
    print(f"  fastest policy for the {name}: {fastest}")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("MNIST_NPZ")
                        or str(Path.home() / ".keras" / "datasets" / "mnist.npz"))
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs per timed run (the first is excluded)")
    parser.add_argument("--policies", default="float32,mixed_bfloat16",
                        help="dtype policies of the fast path to time (mixed_float16 pays on "
                             "GPUs, not on CPUs)")
    parser.add_argument("--skip-end-to-end", action="store_true")
    args = parser.parse_args()
    policies = args.policies.split(",")
    image_shape = vae.to_float_images(vae.load_dataset(args.data)[2][:1]).shape[1:]
    print(f"matmul 2048x2048 here: {matmul_peak_gflops(tf.float32):.0f} GFLOP/s in "
          f"float32, {matmul_peak_gflops(tf.bfloat16):.0f} in bfloat16")
    dense = benchmark_model(vae.DENSE, image_shape, args.data, args.epochs, floor_steps=937,
                            policies=policies)
    conv = benchmark_model(conv_vae.CONV, image_shape, args.data, args.epochs, floor_steps=40,
                           policies=policies)
    for policy in policies:
        keras.config.set_dtype_policy(policy)
        for architecture in (vae.DENSE, conv_vae.CONV):
            profile_layers(f"{architecture.title}, {policy}",
                           *build_networks(architecture, image_shape), architecture.batch_size,
                           xla=architecture.xla)
    keras.config.set_dtype_policy("float32")
    dense_ratio = dense["plain"] / min(dense[policy] for policy in policies)
    print("\ntargets:")
    print(f"  dense fast path >= 3x plain: {dense_ratio:.2f}x -> "
          f"{'met' if dense_ratio >= 3 else 'NOT met'}")
    conv_ratio = conv["plain"] / conv["float32"]
    print(f"  conv fast path (float32) >= 2x plain: {conv_ratio:.2f}x ({conv['float32']:.1f} "
          f"s/epoch) -> {'met' if conv_ratio >= 2 else 'NOT met'}")
    if "mixed_bfloat16" in conv:
        bf16_ratio = conv["plain"] / conv["mixed_bfloat16"]
        verdict = ("met" if bf16_ratio >= 2.5
                   else "NOT met (see the profile above for what is left)")
        print(f"  conv fast path (mixed_bfloat16) >= 2.5x plain: {bf16_ratio:.2f}x "
              f"({conv['mixed_bfloat16']:.1f} s/epoch) -> {verdict}")
    if not args.skip_end_to_end:
        with tempfile.TemporaryDirectory() as results_dir:
            start = time.perf_counter()
            subprocess.run([sys.executable, str(ROOT / "vae.py"), "--latent-dim", "2", "--epochs",
                            "30", "--fid", "pixel", "--data", args.data, "--results-dir",
                            results_dir],
                           cwd=ROOT, check=True, capture_output=True)
            wall = time.perf_counter() - start
            metrics = json.loads((Path(results_dir) / "metrics.json").read_text())
        training, estimate = sum(metrics["seconds_per_epoch"]), metrics["iw_seconds"]
        print(f"  python vae.py --latent-dim 2 --epochs 30 --fid pixel, end to end: {wall:.0f} s "
              f"(target < 120 s) -> {'met' if wall < 120 else 'NOT met'}")
        print(f"    of which training {training:.0f} s, the importance-weighted estimate "
              f"(K={metrics['iw_samples']}, on by default) {estimate:.0f} s, everything else "
              f"{wall - training - estimate:.0f} s (start-up, checkpoints, ELBO, FIDs, figures)")


if __name__ == "__main__":
    main()
