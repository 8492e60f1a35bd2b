"""Training speed benchmark: fast path in float32 and in mixed_bfloat16, against the plain path.

    .venv/bin/python tests/bench/bench_training.py [--data mnist.npz] [--epochs 3]
        [--models dense,conv] [--policies float32,mixed_bfloat16] [--likelihood-images 500]
        [--skip-end-to-end]

Not collected by pytest (its name does not start with test_). It first names the CPU and its kind
and measures the machine's ceiling: a large matrix product in float32 and in bfloat16. For each
model it trains a few full epochs with the fast path (the default) under each dtype policy and with
the plain path (`--plain`: arrays into fit, one step per call, no XLA, Keras' own layers,
float32), each in its own process, and prints the median seconds per epoch after the first (the
first holds tracing and compilation, printed apart), the speed-ups over the plain path, the
arithmetic rate (the FLOP count of an epoch from the layer shapes) as a fraction of that policy's
matmul ceiling, the peak resident memory, and the floor: the train step alone, looped over
in-memory batches inside one compiled program, against the same with the plain path's layers;
then what the progress frame (progress.gif) adds to each epoch, the likelihood estimate (the
model's K) with its own layers and with Keras' in each policy (its share of the matmul peak beside
the train step's; for the convolutional model, its last layer as the estimate and as training run
it), and a per-layer profile of one training step in each policy (for the
convolutions, beside the form each policy does not use) and, without XLA (the convolutional
model), the step's time by TensorFlow op type and the likelihood estimate's by layer; then it times
`python vae.py --latent-dim 2 --epochs 30 --fid pixel` end to end.
Run it with nothing else on the machine: the runs share its cores.
"""

import argparse
import collections
import contextlib
import functools
import json
import math
import subprocess
import os
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

TRAIN_IMAGES, TEST_IMAGES = 60000, 10000
# Both scripts' network options at their defaults (each builder reads its own).
DEFAULT_OPTIONS = dict(latent_dim=2, hidden_dim=256, hidden_layers=1, activation="relu",
                       filters=32, dense_units=32, dense_layers=1, dropout=0.25, plain=False,
                       conditional=False)


def layer_flops(layer):
    """Multiply-adds x 2 of one forward pass of one image through a Dense or convolution layer
    (Keras' or a subclass: the same arithmetic, whatever form computes it)."""
    if isinstance(layer, keras.layers.Dense):
        return 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
    if isinstance(layer, keras.layers.Conv2D):
        height, width = layer.output.shape[1:3]
        return 2 * height * width * np.prod(layer.kernel.shape)
    if isinstance(layer, keras.layers.Conv2DTranspose):
        height, width = layer.input.shape[1:3]
        return 2 * height * width * np.prod(layer.kernel.shape)
    return 0


def forward_flops(*models):
    """FLOP of one image's forward pass through the models."""
    return sum(layer_flops(layer) for model in models for layer in model.layers)


def epoch_gflop(encoder, decoder):
    """Training costs about 3 forward passes (forward, and backward for inputs and weights);
    the test set is one forward pass."""
    forward = forward_flops(encoder, decoder)
    return (3 * forward * TRAIN_IMAGES + forward * TEST_IMAGES) / 1e9


def likelihood_gflop(encoder, decoder, images, num_samples):
    """The estimate encodes each image once and decodes K samples of it."""
    return (forward_flops(encoder) + num_samples * forward_flops(decoder)) * images / 1e9


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


def matmul_peak_gflops(dtype, size=2048, repeats=5, rounds=4):
    """This machine's arithmetic ceiling in dtype, as a large matrix product reaches it (the best
    of a few rounds)."""
    a = tf.cast(tf.random.normal((size, size)), dtype)
    product = tf.function(lambda a: tf.matmul(a, a))
    product(a).numpy()
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            product(a).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * repeats / best / 1e9


def peak_dtype(path):
    """The dtype of the matmul ceiling a path's layers compute against: bfloat16 under
    mixed_bfloat16."""
    return "bfloat16" if path == "mixed_bfloat16" else "float32"


def peak_of(path, peaks):
    return peaks[peak_dtype(path)]


def measure_peaks(policies):
    """The matmul ceiling of each dtype the policies and the plain path compute in (only those: a
    bfloat16 product fails where ONEDNN_MAX_CPU_ISA caps an AMX CPU at AVX2)."""
    return {dtype: matmul_peak_gflops(getattr(tf, dtype))
            for dtype in sorted({peak_dtype(path) for path in (*policies, "plain")}, reverse=True)}


def peaks_line(peaks):
    return ", ".join(f"{gflops:.0f} GFLOP/s in {dtype}" for dtype, gflops in peaks.items())


def milliseconds_per_call(function, x, repeats):
    tf.nest.map_structure(lambda t: t.numpy(), function(x))
    start = time.perf_counter()
    for _ in range(repeats):
        tf.nest.map_structure(lambda t: t.numpy(), function(x))
    return (time.perf_counter() - start) / repeats * 1000


def layer_milliseconds(layer, x, xla, overhead, repeats, input_gradient=True):
    """(forward, forward+backward) of the layer on x, less the cost of a call; the backward pass
    computes the gradient for x only where a step does (not for the images)."""
    forward = tf.function(lambda x: layer(x, training=True), jit_compile=xla)

    @tf.function(jit_compile=xla)
    def forward_backward(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(tf.cast(layer(x, training=True), tf.float32))
        return tape.gradient(y, [x] * input_gradient + layer.trainable_weights)

    return [max(milliseconds_per_call(function, x, repeats) - overhead, 0.0)
            for function in (forward, forward_backward)]


@contextlib.contextmanager
def other_form(layer, input_shape):
    """Traces the layer's convolution in the form its compute dtype does not use: Keras' op where
    conv_vae.MATMUL_DTYPES picks the matrix product, the matrix product where it does not."""
    chosen, dtype = conv_vae.MATMUL_DTYPES, layer.compute_dtype
    conv_vae.MATMUL_DTYPES = (tuple(d for d in chosen if d != dtype) if dtype in chosen
                              else (*chosen, dtype))
    try:
        yield "Keras op" if dtype in chosen else layer.matmul_form(input_shape)
    finally:
        conv_vae.MATMUL_DTYPES = chosen


def profile_layers(name, encoder, decoder, batch_size, xla, peak, repeats=20):
    """Where a training step's time goes: each layer's forward and forward+backward on one batch
    (its input in the dtype the layer before hands it), compiled as the fast path compiles (XLA or
    not), less the cost of calling a compiled function; its arithmetic rate as a fraction of the
    policy's matmul ceiling; and for the matrix-product convolutions, forward+backward in the other
    form."""
    overhead = milliseconds_per_call(tf.function(lambda x: x + 1.0, jit_compile=xla),
                                     tf.zeros((batch_size, 1)), repeats)
    print(f"\n{name}: profile of one training step, batch {batch_size}, "
          f"{'XLA' if xla else 'TF graph'} (ms per step, less {overhead:.2f} ms per call; "
          f"matmul ceiling {peak:.0f} GFLOP/s)")
    print(f"  {'layer':36s} {'output':>13s} {'forward':>8s} {'fwd+bwd':>8s} {'share':>6s} "
          f"{'GFLOP/s':>8s} {'of peak':>7s}  other form, fwd+bwd")
    rows, convolutions_ms, other_form_ms = [], 0.0, 0.0
    for model in (encoder, decoder):
        from_images = model is encoder  # no weights yet between the images and this layer
        for layer in model.layers[1:]:
            x = tf.cast(tf.random.uniform((batch_size, *layer.input.shape[1:])), layer.input.dtype)
            input_gradient = not from_images
            from_images = from_images and not layer.trainable_weights
            times = layer_milliseconds(layer, x, xla, overhead, repeats, input_gradient)
            other = ""
            if getattr(layer, "matmul_form", lambda shape: None)(x.shape):
                with other_form(layer, x.shape) as form:
                    other_ms = layer_milliseconds(layer, x, xla, overhead, repeats,
                                                  input_gradient)[1]
                other = f"{other_ms:8.2f} ({form})"
                convolutions_ms += times[1]
                other_form_ms += other_ms
            passes = 2 + input_gradient  # forward; weights' and (not the images') input gradient
            gflops = passes * layer_flops(layer) * batch_size / max(times[1], 0.01) / 1e6
            rows.append((f"{model.name}/{layer.name}",
                         str(tuple(layer.output.shape[1:])), *times, gflops, other))
    total = sum(row[3] for row in rows)
    for label, shape, forward_ms, both_ms, gflops, other in rows:
        print(f"  {label:36s} {shape:>13s} {forward_ms:8.2f} {both_ms:8.2f} "
              f"{both_ms / total:6.0%} {gflops:8.1f} {gflops / peak:7.1%}  {other}")
    print(f"  {'sum of layers':36s} {'':>13s} {'':>8s} {total:8.2f}   "
          f"(x {TRAIN_IMAGES // batch_size} steps = {total * TRAIN_IMAGES / batch_size / 1000:.1f} "
          "s per epoch of layer arithmetic)")
    if convolutions_ms:  # what conv_vae.MATMUL_DTYPES decides, for this CPU
        print(f"  {'convolutions, fwd+bwd':36s} {'':>13s} {'':>8s} {convolutions_ms:8.2f}   in the "
              f"other form {other_form_ms:.2f} ({other_form_ms / convolutions_ms:.2f}x)")


def training_loop(encoder, decoder, batch_size, xla, data, steps):
    """The train step alone, `steps` batches already in memory looped inside one compiled program
    (no data pipeline, no Keras loop, no test pass), traced and compiled: (loop, its batches)."""
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

    loop(batches).numpy()
    return loop, batches


def training_steps_alone(encoder, decoder, batch_size, xla, data, steps):
    """Seconds per epoch of the train step alone (training_loop): the floor of the fast path."""
    loop, batches = training_loop(encoder, decoder, batch_size, xla, data, steps)
    start = time.perf_counter()
    loop(batches).numpy()
    return (time.perf_counter() - start) / steps * math.ceil(TRAIN_IMAGES / batch_size)


def op_milliseconds(run, runs_per_call, key):
    """Where run()'s time goes, from TensorFlow's profiler: each op's time on the executor threads
    (two threads run ops at once, so the sum exceeds the wall time), summed by key(op name, op
    type), in ms per run; and the wall ms per run. run() does runs_per_call runs."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    with tempfile.TemporaryDirectory() as log_dir:
        tf.profiler.experimental.start(log_dir)
        start = time.perf_counter()
        run()
        wall = (time.perf_counter() - start) / runs_per_call * 1000
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        space.ParseFromString(next(Path(log_dir).rglob("*.xplane.pb")).read_bytes())
    totals = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if line.name.startswith("tf_Compute"):  # the executor threads; events "name:OpType"
                for event in line.events:
                    event_name = plane.event_metadata[event.metadata_id].name
                    op, _, op_type = event_name.rpartition(":")
                    if op and "::" not in event_name:  # not the executor's (Class::Method)
                        totals[key(op, op_type)] += event.duration_ps / 1e9 / runs_per_call
    return totals, wall


def print_op_milliseconds(title, totals, wall, unit, shown):
    total = sum(totals.values())
    print(f"\n{title} ({unit}; {total:.1f} ms of ops on the executor threads, {wall:.1f} ms wall)")
    for label, milliseconds in totals.most_common(shown):
        print(f"  {label:60s} {milliseconds:9.2f} {milliseconds / total:6.1%}")
    print(f"  {'the other ' + str(max(len(totals) - shown, 0)):60s} "
          f"{total - sum(ms for _, ms in totals.most_common(shown)):9.2f}")


def profile_op_types(name, encoder, decoder, batch_size, data, steps=20, shown=14):
    """Where the train step's time goes by TensorFlow op type (convolutions and products, the
    forms' slices, pads and concatenations, casts, the dropout's random bits and masks, Adam's
    updates), over `steps` steps of training_loop without XLA."""
    loop, batches = training_loop(encoder, decoder, batch_size, False, data, steps)
    totals, wall = op_milliseconds(lambda: loop(batches).numpy(), steps,
                                   lambda op, op_type: op_type)
    print_op_milliseconds(f"{name}: the train step by op type, {steps} steps of batch "
                          f"{batch_size}", totals, wall, "ms per step", shown)


def profile_likelihood(name, architecture, x_test, policy, shown=8):
    """Where the likelihood estimate's time goes, by layer and op type (after a first estimate
    has traced it). XLA programs (conv_vae.bias_and_activation, in bfloat16) are not among the
    profiled ops: their time is in the wall time only."""
    model = likelihood_model(architecture, x_test, policy, plain=False)
    estimate = functools.partial(vae.importance_weighted_log_likelihood, model, x_test,
                                 architecture.iw_samples, seed=0, xla=architecture.xla,
                                 verbose=False)
    estimate()
    totals, wall = op_milliseconds(estimate, 1, lambda op, op_type: f"{op.rpartition('/')[0]} "
                                                                   f"({op_type})")
    print_op_milliseconds(f"{name}: the likelihood estimate by layer and op type, K="
                          f"{architecture.iw_samples}, {len(x_test)} test images", totals, wall,
                          "ms per estimate", shown)


def progress_frame_seconds(encoder, decoder, data, frames, repeats=20):
    """What vae.ProgressFrames adds to every epoch for progress.gif: one frame, and the frames file
    rewritten with `frames` earlier ones."""
    x_test = vae.to_float_images(vae.load_dataset(data)[2][:10])
    model = vae.VAE(encoder, decoder)
    model(x_test[:1])
    with tempfile.TemporaryDirectory() as results_dir:
        callback = vae.ProgressFrames(Path(results_dir), x_test, np.zeros((20, 2), np.float32),
                                      vae.Checkpoints(Path(results_dir), {}))
        callback.set_model(model)
        callback.on_epoch_end(0, {"loss": 1.0})
        earlier = callback.frames * frames
        start = time.perf_counter()
        for _ in range(repeats):
            callback.frames = list(earlier)
            callback.on_epoch_end(0, {"loss": 1.0})
    return (time.perf_counter() - start) / repeats


def build_networks(architecture, image_shape, plain=False):
    """The architecture's (encoder, decoder) with the default options, in Keras' current dtype
    policy; plain: with Keras' own layers, as --plain builds them."""
    options = argparse.Namespace(**{**DEFAULT_OPTIONS, "plain": plain})
    return (architecture.build_encoder(options, image_shape),
            architecture.build_decoder(options, image_shape))


def likelihood_model(architecture, x_test, policy, plain):
    """The architecture's VAE with the default options in policy, with the fast path's layers or
    (plain) Keras' own."""
    options = argparse.Namespace(**{**DEFAULT_OPTIONS, "plain": plain}, dtype_policy=policy,
                                 likelihood="gaussian", binarize="none", seed=0, beta=1.0,
                                 kl_warmup_epochs=0)
    model = vae.build_model(options, architecture, x_test.shape[1:])
    model(x_test[:1])
    return model


def likelihood_seconds(architecture, x_test, policy, plain):
    """Seconds of the importance-weighted estimate with the architecture's K, decoding in policy
    (likelihood_model); tracing included, as a run pays it."""
    model = likelihood_model(architecture, x_test, policy, plain)
    start = time.perf_counter()
    vae.importance_weighted_log_likelihood(model, x_test, architecture.iw_samples, seed=0,
                                           xla=architecture.xla, verbose=False)
    return time.perf_counter() - start


def last_layer_milliseconds(decoder, repeats=20):
    """The decoder's last layer, forward, on the most samples a call of the likelihood estimate
    decodes: (outside training, as the estimate runs it; in training, as a step runs it). They
    differ where conv_vae.MatmulConv2DTranspose has an inference-only form (float32, one filter)."""
    layer = decoder.layers[-2]  # the last convolution, before the float32 sigmoid
    decodes = max(1, vae.IW_DECODER_MEMORY // vae.decoded_image_bytes(decoder))
    x = tf.cast(tf.random.uniform((decodes, *layer.input.shape[1:])), layer.input.dtype)
    return decodes, [milliseconds_per_call(tf.function(lambda x, training=training: layer(
        x, training=training)), x, repeats) for training in (False, True)]


def benchmark_model(architecture, image_shape, data, epochs, floor_steps, policies, peaks,
                    likelihood_test):
    """Timed runs of each policy's fast path and of the plain path, and the likelihood estimate
    over likelihood_test (test images; none skip it); returns seconds per epoch by path."""
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
              f"~{seconds[0] - steady:.1f} s of tracing/compilation), peak memory "
              f"{peak_mb:,.0f} MB, test loss after {epochs} epochs {val_loss:.3f}")
    print(f"  {'path':14s}  {'s/epoch':>7s}  {'speed-up over plain':>19s}  {'GFLOP/s':>7s}  "
          "of the matmul peak")
    for path in (*policies, "plain"):
        rate = gflop / results[path]
        print(f"  {path:14s}  {results[path]:7.2f}  {results['plain'] / results[path]:18.2f}x  "
              f"{rate:7.1f}  {rate / peak_of(path, peaks):6.1%} (of "
              f"{peak_of(path, peaks):.0f} GFLOP/s)")
    print(f"  floor: the train step alone, {floor_steps} in-memory batches in one compiled loop, "
          "with the fast path's layers and with Keras' (as --plain builds them, without XLA)")
    floors = {}
    for policy in policies:
        for plain in (True, False):
            keras.config.set_dtype_policy(policy)
            encoder, decoder = build_networks(architecture, image_shape, plain)
            keras.config.set_dtype_policy("float32")
            floors[policy, plain] = training_steps_alone(encoder, decoder, batch_size,
                                                         xla and not plain, data, floor_steps)
        own, keras_own = floors[policy, False], floors[policy, True]
        print(f"    {policy}: {own:.2f} s/epoch ({gflop / own / peak_of(policy, peaks):.1%} of the "
              f"matmul peak); with Keras' layers {keras_own:.2f} s/epoch ({keras_own / own:.2f}x); "
              f"the fast path spends {results[policy] - own:.2f} s/epoch more (data, Keras' loop, "
              "the test pass)")
    if "float32" in policies:
        print("    step-only speed-up over the plain path's layers (Keras', float32): "
              + ", ".join(f"{policy} {floors['float32', True] / floors[policy, False]:.2f}x"
                          for policy in policies))
    watch_cost = progress_frame_seconds(*build_networks(architecture, image_shape), data,
                                        frames=100)
    print(f"  progress frame per epoch (decode, draw, save 100 frames): "
          f"{1000 * watch_cost:.1f} ms, {watch_cost / results[policies[0]]:.2%} of a "
          f"{policies[0]} epoch (target < 2%)")
    if len(likelihood_test):
        likelihood_images = len(likelihood_test)
        estimate_gflop = likelihood_gflop(*build_networks(architecture, image_shape),
                                          likelihood_images, architecture.iw_samples)
        for policy in policies:
            own, keras_own = (min(seconds) for seconds in zip(*(  # alternated, the best of two
                [likelihood_seconds(architecture, likelihood_test, policy, plain)
                 for plain in (False, True)]
                for _ in range(2))))
            share = estimate_gflop / own / peak_of(policy, peaks)
            step_share = gflop / floors[policy, False] / peak_of(policy, peaks)
            print(f"  likelihood estimate, K={architecture.iw_samples}, {likelihood_images} test "
                  f"images, {policy}: {own:.1f} s with tracing, {share:.1%} of the matmul peak "
                  f"(the train step alone: {step_share:.1%}); with Keras' layers {keras_own:.1f} s "
                  f"({keras_own / own:.2f}x)")
            if architecture is conv_vae.CONV:
                keras.config.set_dtype_policy(policy)
                decodes, (inference, training) = last_layer_milliseconds(
                    build_networks(architecture, image_shape)[1])
                keras.config.set_dtype_policy("float32")
                print(f"    its last layer, forward, {decodes} decodes per call: "
                      f"{inference:.2f} ms as the estimate runs it, {training:.2f} ms as training "
                      f"does ({training / inference:.2f}x)")
    fastest = min(policies, key=results.get)
    print(f"  fastest policy for the {name}: {fastest}")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("MNIST_NPZ")
                        or str(Path.home() / ".keras" / "datasets" / "mnist.npz"))
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs per timed run (the first is excluded)")
    parser.add_argument("--models", default="dense,conv", help="dense, conv or both")
    parser.add_argument("--policies", default="float32,mixed_bfloat16",
                        help="dtype policies of the fast path to time (mixed_float16 pays on "
                             "GPUs, not on CPUs)")
    parser.add_argument("--likelihood-images", type=int, default=500,
                        help="test images of the timed likelihood estimates (0 skips them)")
    parser.add_argument("--skip-end-to-end", action="store_true")
    args = parser.parse_args()
    policies, models = args.policies.split(","), args.models.split(",")
    likelihood_test = vae.to_float_images(vae.load_dataset(args.data)[2][:args.likelihood_images])
    image_shape = likelihood_test.shape[1:]
    machine = vae.machine_record()
    cap = f", capped by ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}" if os.environ.get(
        "ONEDNN_MAX_CPU_ISA") else ""
    print(f"CPU: {machine['cpu']}, {machine['cores']} cores, kind {machine['isa']} (oneDNN level "
          f"{machine['onednn_isa']}{cap}); conv_vae.py's matrix-product forms run in: "
          f"{', '.join(conv_vae.MATMUL_DTYPES) or 'none'}")
    peaks = measure_peaks(policies)
    print(f"matmul 2048x2048 here: {peaks_line(peaks)} (the peak the fractions below refer to)")
    architectures = {"dense": (vae.DENSE, 937), "conv": (conv_vae.CONV, 40)}
    results = {model: benchmark_model(architectures[model][0], image_shape, args.data,
                                      args.epochs, architectures[model][1], policies, peaks,
                                      likelihood_test)
               for model in models}
    for policy in policies:
        keras.config.set_dtype_policy(policy)
        for model in models:
            architecture = architectures[model][0]
            profile_layers(f"{architecture.title}, {policy}",
                           *build_networks(architecture, image_shape), architecture.batch_size,
                           xla=architecture.xla, peak=peak_of(policy, peaks))
            if not architecture.xla:  # an XLA program is one op to TensorFlow's profiler
                profile_op_types(f"{architecture.title}, {policy}",
                                 *build_networks(architecture, image_shape),
                                 architecture.batch_size, args.data)
                if len(likelihood_test):
                    profile_likelihood(f"{architecture.title}, {policy}", architecture,
                                       likelihood_test, policy)
    keras.config.set_dtype_policy("float32")
    print(f"\nmatmul 2048x2048 again: {peaks_line(measure_peaks(policies))} (if far from the "
          "first, the machine's load changed during the run)")
    print("\ntargets:")
    if "dense" in results:
        dense = results["dense"]
        dense_ratio = dense["plain"] / min(dense[policy] for policy in policies)
        print(f"  dense fast path >= 3x plain: {dense_ratio:.2f}x -> "
              f"{'met' if dense_ratio >= 3 else 'NOT met'}")
    if "conv" in results:
        conv, gflop = results["conv"], epoch_gflop(*build_networks(conv_vae.CONV, image_shape))
        for policy, target in (("float32", 2), ("mixed_bfloat16", 2.5)):
            if policy in conv:
                ratio = conv["plain"] / conv[policy]
                verdict = "met" if ratio >= target else "NOT met (the profile above: what is left)"
                print(f"  conv fast path ({policy}) >= {target}x plain: {ratio:.2f}x "
                      f"({conv[policy]:.1f} s/epoch, "
                      f"{gflop / conv[policy] / peak_of(policy, peaks):.1%} of the matmul peak) "
                      f"-> {verdict}")
    if "dense" in models and not args.skip_end_to_end:
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
