"""Benchmark of fid.py on the machine it runs on (not a test: run `python tests/bench/bench_fid.py`;
`--classifier-only` leaves out the Inception parts).

- pixel FID of the MNIST test set vs a noisy copy, 10,000 vs 10,000 images (target < 3 s);
- the digit classifier: training it on the 60,000 training images in an empty cache (target <= 60
  s, test accuracy >= 99.0%), then a classifier FID of 10,000 vs 10,000 images (target <= 5 s);
- Inception feature throughput with random weights (target >= 10 images/s):
  fid.compute_features end to end, and its tf.function against the same with
  jit_compile=True and plain model.predict;
- frechet_distance on 2048-d statistics, i.e. the scipy sqrtm every Inception FID pays;
- Inception in mixed_bfloat16 against float32 with the same weights (`--inception-weights FILE`,
  else calibrated random ones, see calibrated_random_inception): images/s of each and how far the
  FID moves (target: within 0.5%), on 1,000 test images vs a noisy copy.
"""

import os
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import fid  # noqa: E402

fid.start_tensorflow()  # without TensorFlow's start-up lines
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

MNIST_PATH = Path(os.environ.get("MNIST_NPZ") or Path.home() / ".keras" / "datasets" / "mnist.npz")
INCEPTION_IMAGES = 200
BATCH_SIZE = 50


def mnist_test_images():
    if MNIST_PATH.exists():
        with np.load(MNIST_PATH) as mnist:
            return mnist["x_test"], "MNIST test set"
    random_images = np.random.default_rng(0).integers(0, 256, (10000, 28, 28), dtype=np.uint8)
    return random_images, "random images"


def noisy_copy(images):
    """images in [0, 1] plus Gaussian noise of standard deviation 0.1, clipped to [0, 1]."""
    noise = 0.1 * np.random.default_rng(0).standard_normal(images.shape)
    return np.clip(images / 255 + noise, 0, 1)


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def bench_pixel_fid():
    images, source = mnist_test_images()
    noisy = noisy_copy(images)
    distance, seconds = timed(fid.pixel_fid, images, noisy)
    print(f"pixel FID, {source} vs noisy copy ({len(images)} vs {len(noisy)}): "
          f"{distance:.4f} in {seconds:.2f} s (target < 3 s)")


def bench_classifier():
    if not MNIST_PATH.exists():
        print(f"classifier: skipped, {MNIST_PATH} not found")
        return
    with np.load(MNIST_PATH) as mnist:
        data = [mnist[key] for key in ("x_train", "y_train", "x_test", "y_test")]
    classifier, seconds = timed(fid.train_classifier, *data, verbose=False)  # not the committed one
    print(f"classifier: trained on {len(data[0])} images in {seconds:.1f} s "
          f"(target <= 60 s); test accuracy {classifier.test_accuracy:.2%} (target >= 99.0%)")
    images = data[2]
    noisy = noisy_copy(images)
    distance, seconds = timed(lambda: fid.frechet_distance(*(
        fid.statistics_from_features(fid.compute_features(x, "classifier", classifier), "classifier")
        for x in (images, noisy))))
    print(f"classifier FID, MNIST test set vs noisy copy ({len(images)} vs {len(noisy)}): "
          f"{distance:.4f} in {seconds:.2f} s (target <= 5 s)")


def bench_inception_throughput():
    """The methods take turns batch by batch, so load from others on the shared cores hits all
    alike."""
    images, _ = mnist_test_images()
    images = images[:INCEPTION_IMAGES]
    model = fid.load_inception(None)
    print(f"Inception features, random weights, {len(images)} images, batch size {BATCH_SIZE}:")
    _, seconds = timed(fid.compute_features, images, "inception", model, batch_size=BATCH_SIZE,
                       verbose=False)
    print(f"  fid.compute_features, end to end with tracing: "
          f"{len(images) / seconds:.1f} images/s")

    def extractor(jit_compile):
        return tf.function(lambda batch: model(fid.inception_preprocess(batch), training=False),
                           jit_compile=jit_compile)

    batches = [images[start:start + BATCH_SIZE].astype(np.float32) / 255
               for start in range(0, len(images), BATCH_SIZE)]
    preprocessed = [fid.inception_preprocess(batch).numpy() for batch in batches]
    methods = {
        "tf.function(preprocess + model), as in fid.py": (extractor(jit_compile=False), batches),
        "the same with jit_compile=True": (extractor(jit_compile=True), batches),
        "plain model.predict on preprocessed 299x299 batches "
        f"(jit_compile={model.jit_compile})":
            (lambda batch: model.predict(batch, batch_size=BATCH_SIZE, verbose=0), preprocessed),
    }
    seconds = dict.fromkeys(methods, 0.0)
    for name, (extract, inputs) in methods.items():
        np.asarray(extract(inputs[0]))  # trace / compile outside the timing
    for index in range(len(batches)):
        for name, (extract, inputs) in methods.items():
            seconds[name] += timed(lambda: np.asarray(extract(inputs[index])))[1]
    print("  taking turns batch by batch, after warm-up:")
    for name, total in seconds.items():
        print(f"    {name}: {len(images) / total:.1f} images/s")


def bench_inception_frechet_distance():
    features = np.random.default_rng(0).standard_normal((2 * 4096, 2048))
    a, b = (fid.Statistics(mu=half.mean(axis=0), sigma=np.cov(half, rowvar=False), n=len(half),
                           features="inception") for half in np.split(features, 2))
    distance, seconds = timed(fid.frechet_distance, a, b)
    print(f"frechet_distance on 2048-d statistics (scipy sqrtm): {distance:.4f} in "
          f"{seconds:.1f} s")


def calibrated_random_inception(images):
    """Random Inception weights whose batch-norm statistics are set from these images, so every
    layer's activations have the unit scale a trained network's have. Plain random weights
    (statistics 0 and 1) let the activations fade through 94 layers: every image then gets nearly
    the same features and the FID is 0.0000, which says nothing about precision."""
    model = fid.load_inception(None)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0  # one training-mode pass sets the moving statistics to the batch's
    model(fid.inception_preprocess(images.astype(np.float32) / 255), training=True)
    return model


def bench_inception_bfloat16(weights, count=1000):
    images, source = mnist_test_images()
    noisy = noisy_copy(images[:count]).astype(np.float32)
    reference = (fid.load_inception(weights) if weights
                 else calibrated_random_inception(images[-32:]))
    images = images[:count]
    described = (f"weights {weights}" if weights
                 else "random weights with calibrated batch norms")
    print(f"Inception FID in float32 and mixed_bfloat16, {source}, {count} images vs a noisy "
          f"copy, {described}:")
    distances = {}
    for policy in ("float32", "mixed_bfloat16"):
        model = fid.load_inception(weights, dtype_policy=policy)
        model.set_weights(reference.get_weights())
        fid.compute_features(images[:BATCH_SIZE], "inception", model, batch_size=BATCH_SIZE,
                             verbose=False)  # traces
        start = time.perf_counter()
        statistics = [fid.statistics_from_features(fid.compute_features(
            x, "inception", model, batch_size=BATCH_SIZE, verbose=False), "inception")
            for x in (images, noisy)]
        seconds = time.perf_counter() - start
        distances[policy] = fid.frechet_distance(*statistics)
        print(f"  {policy:15s}: FID {distances[policy]:.4f}, "
              f"{2 * count / seconds:.1f} images/s")
    change = abs(distances["mixed_bfloat16"] / distances["float32"] - 1)
    print(f"  mixed_bfloat16 moves the FID by {change:.3%} (target <= 0.5%) -> "
          f"{'met' if change <= 0.005 else 'NOT met'}")


if __name__ == "__main__":
    bench_pixel_fid()
    bench_classifier()
    if "--classifier-only" not in sys.argv:
        bench_inception_throughput()
        bench_inception_frechet_distance()
        weights = (sys.argv[sys.argv.index("--inception-weights") + 1]
                   if "--inception-weights" in sys.argv else None)
        bench_inception_bfloat16(weights)
