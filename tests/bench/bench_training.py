"""Training speed benchmark: the default path in float32 and in mixed_bfloat16, against --plain.

    .venv/bin/python tests/bench/bench_training.py [--data mnist.npz] [--epochs 3]
        [--models dense,conv] [--policies float32,mixed_bfloat16] [--train-size N] [--test-size N]
        [--likelihood-images 500] [--skip-end-to-end]
    .venv/bin/python tests/bench/bench_training.py --burda [--baseline COMMIT]

Not collected by pytest (its name does not start with test_). It names the CPU and the command,
and measures the machine's ceiling: a large matrix product in float32 and in bfloat16. For each
model it trains a few epochs on the default path under each dtype policy and on the plain path
(`--plain`: arrays into fit, one batch per step, no XLA, Keras' Dropout, float32), each in its own
process, and prints the median seconds per epoch after the first (which holds tracing and
compilation), the speed-up over the plain path, the arithmetic rate (an epoch's FLOP from the layer
shapes) as a share of that policy's matmul ceiling and the peak resident memory; then the train
step alone (in-memory batches looped inside one compiled program) in each policy and as --plain
builds it, the likelihood estimate (the model's K) in each policy, and a per-layer profile of one
training step in each policy; last, `python vae.py --latent-dim 2 --epochs 30 --fid pixel` end to
end. `--burda` times Burda et al.'s recipe alone (with `--baseline COMMIT` against vae.py at that
commit) and its dynamic binarization's share of the train step. Run it with nothing else on the
machine: the runs share its cores.
"""

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import conv_vae  # noqa: E402 (it starts TensorFlow without its start-up lines)
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
import vae  # noqa: E402

tf.get_logger().setLevel("ERROR")  # not the retracing warnings of the functions made per model

ARCHITECTURES = {"dense": vae.DENSE, "conv": conv_vae.CONV}
STEP_ALONE_BATCHES = {"dense": 937, "conv": 40}  # batches of the train-step-alone loop, at most


def layer_flops(layer):
    """Multiply-adds x 2 of one image's forward pass through a Dense or convolution layer."""
    if isinstance(layer, keras.layers.Dense):
        return 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
    if isinstance(layer, keras.layers.Conv2DTranspose):  # before Conv2D: it is a subclass
        return 2 * math.prod(layer.input.shape[1:3]) * math.prod(layer.kernel.shape)
    if isinstance(layer, keras.layers.Conv2D):
        return 2 * math.prod(layer.output.shape[1:3]) * math.prod(layer.kernel.shape)
    return 0


def forward_flops(*networks):
    return sum(layer_flops(layer) for network in networks for layer in network.layers)


def epoch_gflop(model, train_images, test_images):
    """Training costs about 3 forward passes (forward, backward for inputs and for weights); the
    test set one."""
    return forward_flops(model.encoder, model.decoder) * (3 * train_images + test_images) / 1e9


def likelihood_gflop(encoder, decoder, images, num_samples):
    """The estimate encodes each image once and decodes K samples of it."""
    return (forward_flops(encoder) + num_samples * forward_flops(decoder)) * images / 1e9


def matmul_peak_gflops(dtype, size=2048, rounds=5):
    """This machine's arithmetic ceiling in dtype: the best of a few large matrix products."""
    a = tf.cast(tf.random.normal((size, size)), dtype)
    product = tf.function(lambda a: tf.matmul(a, a))
    product(a).numpy()
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        product(a).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def peak_dtype(policy):
    """The dtype a policy's layers compute in, as far as the matmul ceiling goes."""
    return "bfloat16" if policy == "mixed_bfloat16" else "float32"


def build(architecture, image_shape, policy="float32", plain=False):
    """The architecture's VAE with its defaults, its layers in policy (--plain: as it builds
    them), and its options."""
    options = vae.build_parser(architecture)[0].parse_args(
        ["--dtype-policy", policy, *["--plain"] * plain])
    model = vae.build_model(options, architecture, image_shape)
    model(tf.zeros((1, *image_shape)))
    return model, options


def timed_run(script, args, extra, root=ROOT):
    """One training run in its own process (of root's script): (seconds per epoch, peak resident
    MB, last test loss)."""
    sizes = [arg for name in ("train_size", "test_size") if getattr(args, name)
             for arg in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
    with tempfile.TemporaryDirectory() as results_dir:
        subprocess.run([sys.executable, str(root / script), "--data", args.data, "--results-dir",
                        results_dir, "--epochs", str(args.epochs), "--fid", "none",
                        "--iw-samples", "0", *sizes, *extra],
                       cwd=ROOT, check=True, capture_output=True)
        metrics = json.loads((Path(results_dir) / "metrics.json").read_text())
    return metrics["seconds_per_epoch"], metrics["peak_memory_mb"], metrics["final_test_loss"]


def step_alone_seconds(model, options, x_train, steps, xla, train_images):
    """Seconds per epoch of the train step alone: `steps` in-memory batches looped inside one
    compiled program (no data pipeline, no Keras loop, no test pass), after a traced first loop."""
    batch_size = options.batch_size
    batches = tf.constant(x_train[:steps * batch_size].reshape(steps, batch_size,
                                                               *x_train.shape[1:]))
    vae.compile_model(model, options, xla=False)

    @tf.function(jit_compile=xla)
    def loop(batches):
        for i in tf.range(tf.shape(batches)[0]):
            model.train_step(batches[i])
        return model.optimizer.iterations

    loop(batches).numpy()
    start = time.perf_counter()
    loop(batches).numpy()
    return (time.perf_counter() - start) / steps * math.ceil(train_images / batch_size)


def likelihood_seconds(model, architecture, x_test):
    """Seconds of the importance-weighted estimate with the architecture's K, tracing included
    (as a run pays it)."""
    start = time.perf_counter()
    vae.importance_weighted_log_likelihood(model, x_test, architecture.iw_samples, seed=0,
                                           xla=architecture.xla, verbose=False)
    return time.perf_counter() - start


def milliseconds_per_call(function, x, repeats):
    tf.nest.map_structure(lambda t: t.numpy(), function(x))
    start = time.perf_counter()
    for _ in range(repeats):
        tf.nest.map_structure(lambda t: t.numpy(), function(x))
    return (time.perf_counter() - start) / repeats * 1000


def profile_layers(title, model, batch_size, xla, peak, repeats=20):
    """Where a training step's time goes: each layer's forward and forward+backward on one batch
    (its input in the dtype the layer before hands it), compiled as the default path compiles
    (XLA or not), less the cost of calling a compiled function, and its rate as a share of the
    matmul ceiling. The backward pass takes the input's gradient except where no weights lie
    between the images and the layer (a step does not compute it there)."""
    overhead = milliseconds_per_call(tf.function(lambda x: x + 1.0, jit_compile=xla),
                                     tf.zeros((batch_size, 1)), repeats)
    print(f"\n{title}: one training step by layer, batch {batch_size}, "
          f"{'XLA' if xla else 'TF graph'} (ms, less {overhead:.2f} ms per call; matmul ceiling "
          f"{peak:.0f} GFLOP/s)")
    print(f"  {'layer':36s} {'output':>13s} {'forward':>8s} {'fwd+bwd':>8s} {'share':>6s} "
          f"{'GFLOP/s':>8s} {'of peak':>7s}")
    rows = []
    for network in (model.encoder, model.decoder):
        from_images = network is model.encoder
        for layer in network.layers[1:]:
            x = tf.cast(tf.random.uniform((batch_size, *layer.input.shape[1:])), layer.input.dtype)
            input_gradient = not from_images
            from_images = from_images and not layer.trainable_weights

            @tf.function(jit_compile=xla)
            def forward_backward(x, layer=layer, input_gradient=input_gradient):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    y = tf.reduce_sum(tf.cast(layer(x, training=True), tf.float32))
                return tape.gradient(y, [x] * input_gradient + layer.trainable_weights)

            forward = tf.function(lambda x, layer=layer: layer(x, training=True),
                                  jit_compile=xla)
            times = [max(milliseconds_per_call(f, x, repeats) - overhead, 0.0)
                     for f in (forward, forward_backward)]
            gflops = ((2 + input_gradient) * layer_flops(layer) * batch_size
                      / max(times[1], 0.01) / 1e6)
            rows.append((f"{network.name}/{layer.name}", str(tuple(layer.output.shape[1:])),
                         *times, gflops))
    total = sum(row[3] for row in rows)
    for label, shape, forward_ms, both_ms, gflops in rows:
        print(f"  {label:36s} {shape:>13s} {forward_ms:8.2f} {both_ms:8.2f} "
              f"{both_ms / max(total, 1e-9):6.0%} {gflops:8.1f} {gflops / peak:7.1%}")
    print(f"  {'sum of layers':36s} {'':>13s} {'':>8s} {total:8.2f}")


def benchmark_model(name, args, x_train, x_test, peaks):
    """Every measure of one model; returns {path: seconds per epoch}."""
    architecture, policies = ARCHITECTURES[name], args.policies
    train_images, test_images = args.train_size or 60000, args.test_size or 10000
    image_shape = x_test.shape[1:]
    gflop = epoch_gflop(build(architecture, image_shape)[0], train_images, test_images)
    print(f"\n{architecture.title} (batch {architecture.batch_size}): {gflop:.1f} GFLOP per epoch "
          f"({train_images} training images, 3 passes; {test_images} test images, 1 pass)")
    print(f"  {'path':14s} {'s/epoch':>8s} {'first':>7s} {'vs plain':>8s} {'GFLOP/s':>8s} "
          f"{'of peak':>7s} {'peak MB':>8s} {'test loss':>9s}")
    runs = {path: timed_run(architecture.script, args, extra) for path, extra in
            [(policy, ["--dtype-policy", policy]) for policy in policies]
            + [("plain", ["--plain"])]}
    results = {path: float(np.median(seconds[1:] or seconds)) for path, (seconds, _, _)
               in runs.items()}
    for path, (seconds, peak_mb, test_loss) in runs.items():
        rate = gflop / results[path]
        print(f"  {path:14s} {results[path]:8.2f} {seconds[0]:7.2f} "
              f"{results['plain'] / results[path]:7.2f}x {rate:8.1f} "
              f"{rate / peaks[peak_dtype(path)]:7.1%} {peak_mb:8,.0f} {test_loss:9.3f}")

    steps = max(1, min(STEP_ALONE_BATCHES[name], len(x_train) // architecture.batch_size))
    print(f"  the train step alone ({steps} in-memory batches in one compiled loop), s/epoch:")
    plain = step_alone_seconds(*build(architecture, image_shape, plain=True), x_train, steps,
                               False, train_images)
    for policy in policies:
        model, options = build(architecture, image_shape, policy)
        seconds = step_alone_seconds(model, options, x_train, steps, architecture.xla,
                                     train_images)
        print(f"    {policy:14s} {seconds:8.2f} ({gflop / seconds / peaks[peak_dtype(policy)]:.1%}"
              f" of the peak; {plain / seconds:.2f}x the plain step; the full run spends "
              f"{results[policy] - seconds:.2f} s/epoch more)")
    print(f"    {'plain':14s} {plain:8.2f} (float32, --plain's layers, no XLA)")

    if len(x_test) and args.likelihood_images:
        x = x_test[:args.likelihood_images]
        for policy in policies:
            model = build(architecture, image_shape, policy)[0]
            seconds = likelihood_seconds(model, architecture, x)
            rate = likelihood_gflop(model.encoder, model.decoder, len(x),
                                    architecture.iw_samples) / seconds
            print(f"  likelihood estimate, K={architecture.iw_samples}, {len(x)} test images, "
                  f"{policy}: {seconds:.2f} s with tracing, {rate:.1f} GFLOP/s "
                  f"({rate / peaks[peak_dtype(policy)]:.1%} of the peak)")
    return results


# Burda et al.'s (2016) VAE: vae.py's flags for its network, data and batches.
BURDA = ["--likelihood", "bernoulli", "--binarize", "dynamic", "--latent-dim", "50",
         "--hidden-dim", "200", "--hidden-layers", "2", "--activation", "tanh", "--batch-size", "20",
         "--train-size", "59600"]


def burda_epochs(args, rounds=3):
    """The recipe's seconds per epoch, and with --baseline the recipe's as vae.py at that git commit
    runs it, alternated (the fastest of each: the speed-up since the baseline); then the share of
    the recipe's train step its dynamic binarization takes."""
    print(f"\nBurda et al.'s VAE ({shlex.join(BURDA)}), s/epoch after the first, alternated:")
    with tempfile.TemporaryDirectory() as baseline:
        runs = {"recipe": ROOT}
        if args.baseline:  # the repository's files at that commit
            files = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline],
                                   check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", baseline], input=files, check=True)
            runs[f"recipe at {args.baseline}"] = Path(baseline)
        times = {label: [] for label in runs}
        for _ in range(rounds):
            for label, root in runs.items():
                seconds = timed_run("vae.py", argparse.Namespace(
                    **{**vars(args), "train_size": None}), BURDA, root)[0]
                times[label].append(float(np.median(seconds[1:] or seconds)))
    for label, values in times.items():
        print(f"  {label:22s} {' '.join(f'{value:6.2f}' for value in values)}")
    if args.baseline:
        recipe, earlier = (min(values) for values in times.values())
        print(f"  the recipe's epoch against {args.baseline}'s (fastest of each): "
              f"1/{earlier / recipe:.2f}")
    print(f"  the binarization's share of the recipe's train step: {binarization_share(args):.1%} "
          "(one group of batches in one compiled step, with and without it, alternated)")


def binarization_share(args, rounds=20):
    """1 - (the recipe's compiled train step on one group of batches without its dynamic
    binarization) / (with it), the fastest of `rounds` alternated calls of each."""
    options = vae.build_parser(vae.DENSE)[0].parse_args(BURDA)
    x = vae.to_float_images(vae.load_dataset(args.data)[0][:vae.BATCHES_PER_STEP * 20])
    group = tf.constant(x.reshape(vae.BATCHES_PER_STEP, 20, *x.shape[1:]))
    steps = {}
    for binarize in ("dynamic", "none"):
        options.binarize = binarize
        model = vae.build_model(options, vae.DENSE, x.shape[1:])
        model(x[:1])
        vae.compile_model(model, options, xla=True)
        steps[binarize] = tf.function(model.train_step, jit_compile=True)
        steps[binarize](group)  # traced and compiled
    fastest = {binarize: math.inf for binarize in steps}
    for _ in range(rounds):
        for binarize, step in steps.items():
            start = time.perf_counter()
            step(group)["loss"].numpy()
            fastest[binarize] = min(fastest[binarize], time.perf_counter() - start)
    return 1 - fastest["none"] / fastest["dynamic"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("MNIST_NPZ")
                        or str(Path.home() / ".keras" / "datasets" / "mnist.npz"))
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs per timed run (the first is excluded)")
    parser.add_argument("--models", default="dense,conv", help="dense, conv or both")
    parser.add_argument("--policies", type=lambda text: text.split(","),
                        default="float32,mixed_bfloat16",
                        help="dtype policies of the default path to time (mixed_float16 pays on "
                             "GPUs, not on CPUs)")
    parser.add_argument("--train-size", type=int, help="train on the first N images")
    parser.add_argument("--test-size", type=int, help="test on the first N test images")
    parser.add_argument("--likelihood-images", type=int, default=500,
                        help="test images of the timed likelihood estimates (0 skips them)")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--burda", action="store_true",
                        help="time only Burda et al.'s recipe and its binarization's share")
    parser.add_argument("--baseline", metavar="COMMIT",
                        help="with --burda, time the recipe as vae.py at this git commit runs it too")
    args = parser.parse_args()
    machine = vae.machine_record()
    print(f"CPU: {machine['cpu']}, {machine['cores']} cores, {machine['isa']}, "
          f"ONEDNN_MAX_CPU_ISA={machine['onednn_max_cpu_isa'] or 'unset'}; command: "
          f"{shlex.join(['python', *sys.argv])}", flush=True)
    if args.burda:
        return burda_epochs(args)
    x_train, _, x_test, _ = vae.load_dataset(args.data)
    x_train = vae.to_float_images(x_train[:args.train_size])
    x_test = vae.to_float_images(x_test[:args.test_size])
    peaks = {dtype: matmul_peak_gflops(dtype)
             for dtype in dict.fromkeys(peak_dtype(p) for p in ["plain", *args.policies])}
    print("matmul 2048x2048 here: " + ", ".join(f"{gflops:.0f} GFLOP/s in {dtype}"
                                                for dtype, gflops in peaks.items()))
    models = args.models.split(",")
    for name in models:
        benchmark_model(name, args, x_train, x_test, peaks)
    for policy in args.policies:
        for name in models:
            architecture = ARCHITECTURES[name]
            profile_layers(f"{architecture.title}, {policy}",
                           build(architecture, x_test.shape[1:], policy)[0],
                           architecture.batch_size, architecture.xla,
                           peaks[peak_dtype(policy)])
    if "dense" in models and not args.skip_end_to_end:
        with tempfile.TemporaryDirectory() as results_dir:
            start = time.perf_counter()
            subprocess.run([sys.executable, str(ROOT / "vae.py"), "--latent-dim", "2", "--epochs",
                            "30", "--fid", "pixel", "--data", args.data, "--results-dir",
                            results_dir], cwd=ROOT, check=True, capture_output=True)
            wall = time.perf_counter() - start
            metrics = json.loads((Path(results_dir) / "metrics.json").read_text())
        training, estimate = sum(metrics["seconds_per_epoch"]), metrics["iw_seconds"]
        print(f"\npython vae.py --latent-dim 2 --epochs 30 --fid pixel, end to end: {wall:.0f} s "
              f"(target < 120 s): training {training:.0f} s, the likelihood estimate "
              f"(K={metrics['iw_samples']}) {estimate:.0f} s, everything else "
              f"{wall - training - estimate:.0f} s")


if __name__ == "__main__":
    main()
