"""Fréchet distances (FID) between two sets of MNIST-like images, in three feature spaces:

- "inception": the standard FID (Heusel et al. 2017) on the 2048-d pool features of
  Keras' InceptionV3. Keras' ImageNet weights are not the TF-slim graph that pytorch-fid and
  the original TTUR code use, so the numbers are comparable with each other, not with papers.
- "pixel": the same formula on raw pixels, the metric the original repo reported
  (test images vs reconstructions: 20.359 / 15.511).
- "classifier": the 128-d penultimate layer of a small convolutional classifier trained on the
  data itself, as TTUR's authors advise for data unlike ImageNet (and as TF-GAN's
  mnist_frechet_distance and Bińkowski et al.'s LeNet features do). Trained once per training
  set from a fixed seed and cached; MNIST's is committed (results/classifiers), so that its FIDs
  compare across machines. Comparable only between runs that use the same classifier.

On the same features: the kernel distance (KID, Bińkowski et al. 2018), unbiased and with no
Gaussian assumption, and precision, recall, density and coverage (Kynkäänniemi et al. 2019,
Naeem et al. 2020), which tell fidelity (samples look real) from diversity (they cover the data).

Command line, in the style of pytorch-fid (`python -m pytorch_fid A B`):
    python fid.py A B                          FID between two image sets or statistics files
    python fid.py --save-stats IMAGES OUT.npz  save statistics to compare against later
    python fid.py REAL FAKE --kid --prdc       add KID and precision/recall/density/coverage
"""

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import matplotlib.image
import numpy as np
import scipy.linalg

# TensorFlow and Keras are imported by the functions that run a network: without them, distances
# in pixel space and between saved features start in a second instead of about ten.

FEATURE_KINDS = ("pixel", "classifier", "inception")
INCEPTION_INPUT_SHAPE = (299, 299, 3)
SQRTM_EPS = 1e-6
MAX_IMAGINARY_COMPONENT = 1e-3  # pytorch-fid's tolerance on the diagonal of sqrtm
LUMINANCE_WEIGHTS = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, for RGB inputs
KID_SUBSET_SIZE = 1000  # as in torch-fidelity and the KID authors' code
NEAREST_NEIGHBOURS = 5  # k of precision / recall / density / coverage (see their function)


# ---- Shared helpers: command line, I/O, network calls (vae.py and conv_vae.py use them too) ----


@dataclasses.dataclass(frozen=True)
class Metric:
    """How to read one number of a run's metrics.json: which way is better, its decimals in the
    printed summary and in tables, its unit, its name in a table's header."""

    higher_is_better: bool
    digits: int
    table_digits: int
    unit: str
    label: str


MANIFOLD_METRICS = {"precision": "of generated images", "recall": "of test images",
                    "density": "", "coverage": "of test images"}  # and what each is a share of


def run_metrics():
    """The metrics a run reports, by metrics.json key, in the printed summary's order: the one
    declaration that vae.py's summary, sweep.py's objectives and reports, and the results tables
    read. (Per loss term, vae.py adds test_<term> in nats.)"""
    metrics = {
        "fid_pixel_recon": Metric(False, 3, 2, "", "pixel FID recon"),
        "test_elbo": Metric(True, 3, 2, "nats per image", "test ELBO"),
        "test_log_likelihood_iw": Metric(True, 3, 2, "nats per image", "log p(x)"),
        "active_units": Metric(True, 0, 0, "latent dimensions in use", "active units"),
        "final_train_loss": Metric(False, 3, 2, "per image, as trained", "train loss"),
        "final_test_loss": Metric(False, 3, 2, "per image, as trained", "test loss"),
    }
    for kind in FEATURE_KINDS:
        for images in ("recon", "samples"):
            fid_digits = 2 if kind == "pixel" else 1
            metrics.setdefault(f"fid_{kind}_{images}",
                               Metric(False, 3, fid_digits, "", f"{kind} FID {images}"))
            if kind == "pixel":
                continue
            metrics[f"kid_{kind}_{images}"] = Metric(False, 5, 2, "", f"{kind} KID {images}")
            for name, share in MANIFOLD_METRICS.items():
                metrics[f"{name}_{kind}_{images}"] = Metric(True, 3, 3, share,
                                                            f"{kind} {name} {images}")
    metrics["classifier_test_accuracy"] = Metric(True, 4, 4, "of test images",
                                                 "classifier accuracy")
    metrics["label_accuracy"] = Metric(True, 4, 3, "of samples of the class asked for",
                                       "label accuracy")
    return metrics


RUN_METRICS = run_metrics()


EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class UsageError(Exception):
    """Bad input, found before any work is lost: one line, exit code 2."""


class RunFailed(Exception):
    """A run that cannot go on (a NaN loss, a full disk); what it saved is intact. Exit code 1."""


def exit_code(prog, work, interrupted="the checkpoints and outputs already written are intact"):
    """work() with every failure turned into one line and an exit code, as each script's main
    returns it: 2 for bad input, 1 for a failed run, 130 for an interrupt (its message, else
    `interrupted`), 0 for success."""
    try:
        work()
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except RunFailed as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as error:
        print(f"\ninterrupted: {error or interrupted}")
        return EXIT_INTERRUPTED
    return 0


def whole_number(name, minimum, requirement):
    """An argparse type for whole numbers of at least `minimum`: a smaller one fails at parse
    time, with the usage line, as "must be <requirement>"; name is the type's name in argparse's
    own message ("invalid positive_int value")."""
    def parse(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    parse.__name__ = name
    return parse


positive_int = whole_number("positive_int", 1, "a positive integer")  # counts and sizes
non_negative_int = whole_number("non_negative_int", 0, "0 or more")  # 0 means "none"


def positive_float(text):
    """argparse type for rates and weights: NaN and inf would not fail until training."""
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def unit_interval(text):
    """argparse type for fractions such as dropout, where 1 would drop everything."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors in the same single `PROG: error: ...` line as every other error, and no
    abbreviated options (argparse would take --epoch for --epochs, and a later option could
    change what an abbreviation means)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


# What TensorFlow prints on a CPU-only machine before its logging starts (so TF_CPP_MIN_LOG_LEVEL
# cannot silence it), each line twice: dropped by start_tensorflow, one known message each.
TENSORFLOW_STARTUP_LINES = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"
    r"|[IWE]\d{4} [\d:.]+ +\d+ (port\.cc:\d+\] oneDNN custom operations are on\."
    r"|cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, GPU will not be used\.$"
    r"|cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized to use available CPU "
    r"instructions in performance-critical operations\.$"
    r"|cuda_platform\.cc:\d+\] failed call to cuInit: )"
    r"|To enable the following instructions: .*, in other operations, rebuild TensorFlow with the "
    r"appropriate compiler flags\.$")
SHOW_TENSORFLOW_STARTUP = "VAE_TENSORFLOW_LOGS"  # set to 1 to see those lines


@contextlib.contextmanager
def stderr_without(lines):
    """Standard error, at the file descriptor (where TensorFlow's C++ writes), held back while the
    block runs, then passed on without the lines that match the pattern `lines`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(keepends=True)
                    if not lines.match(line.rstrip("\n"))]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def start_tensorflow():
    """Import TensorFlow and Keras and start TensorFlow's devices (where the CUDA probe prints),
    without TensorFlow's start-up lines (TENSORFLOW_STARTUP_LINES); every other line, an error
    included, still shows. VAE_TENSORFLOW_LOGS=1 shows them all."""
    if "tensorflow" in sys.modules:
        return
    quiet = os.environ.get(SHOW_TENSORFLOW_STARTUP) != "1"
    with stderr_without(TENSORFLOW_STARTUP_LINES) if quiet else contextlib.nullcontext():
        import keras  # noqa: F401 (imports TensorFlow)
        import tensorflow as tf

        tf.config.list_physical_devices()


def atomic_write(path, write):
    """Call write(temporary_path) beside path, then rename onto it (atomic on one file system):
    a full disk or a Ctrl-C mid-write never leaves a truncated file."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def save_npz(path, **arrays):
    """np.savez through atomic_write: a cache entry is whole or absent."""
    def write(temporary):
        with open(temporary, "wb") as file:  # a file object: savez would append .npz to a name
            np.savez(file, **arrays)
    atomic_write(path, write)


def format_duration(seconds: float) -> str:
    """Seconds up to 90 s, minutes above: for the estimates printed before long passes."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def in_batches(network, inputs, batch_size=1000, prepare=None):
    """A Keras network's outputs for all inputs (an array, or a list of arrays for a network of
    several inputs), as NumPy arrays (a list of them for several outputs). Eager calls, batch by
    batch: the same values as predict, without the function predict traces for each network and
    input shape. prepare(batch) converts each batch first, so that only one batch of the converted
    inputs is ever held."""
    import keras

    several = isinstance(inputs, list)
    outputs = []
    for start in range(0, len(inputs[0] if several else inputs), batch_size):
        batch = ([part[start:start + batch_size] for part in inputs] if several
                 else inputs[start:start + batch_size])
        outputs.append(network(prepare(batch) if prepare else batch, training=False))
    if isinstance(outputs[0], (list, tuple)):
        return [np.concatenate([keras.ops.convert_to_numpy(batch[i]) for batch in outputs])
                for i in range(len(outputs[0]))]
    return np.concatenate([keras.ops.convert_to_numpy(batch) for batch in outputs])


# ---- Fréchet distance and image statistics ----


@dataclasses.dataclass(frozen=True, eq=False)
class Statistics:
    """Gaussian fitted to the features of an image set: all FID needs from it."""

    mu: np.ndarray  # float64, (d,)
    sigma: np.ndarray  # float64, (d, d)
    n: int
    features: str  # one of FEATURE_KINDS


class InceptionUnavailable(Exception):
    """The Inception weights could not be loaded (offline, missing or bad file)."""


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)), as in pytorch-fid."""
    if a.features != b.features:
        raise ValueError(f"cannot compare {a.features} statistics with {b.features} statistics")
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    # Pixel covariances are always singular (MNIST's border pixels never change), so scipy
    # would warn on every call; finiteness and the imaginary part are checked explicitly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma)
        if not np.isfinite(covmean).all():
            print(f"fid: sqrtm of the covariance product is not finite (near-singular); "
                  f"retrying with {SQRTM_EPS} added to both diagonals", file=sys.stderr)
            offset = np.eye(a.sigma.shape[0]) * SQRTM_EPS
            covmean = scipy.linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset))
    if not np.isfinite(covmean).all():
        raise ValueError("sqrtm of the covariance product is not finite, even with eps added")
    if np.iscomplexobj(covmean):
        largest_imaginary = np.abs(np.diagonal(covmean).imag).max()
        if largest_imaginary > MAX_IMAGINARY_COMPONENT:
            raise ValueError(f"sqrtm of the covariance product has an imaginary component of "
                             f"{largest_imaginary:.3g} on its diagonal: are both covariances "
                             f"positive semi-definite?")
        covmean = covmean.real
    mean_difference = a.mu - b.mu
    return float(mean_difference @ mean_difference
                 + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


def check_images(images, *, flat_allowed=False) -> np.ndarray:
    """Images as (N, H, W) (or (N, D) if flat_allowed), uint8 0-255 or float in [0, 1].

    Out-of-range floats (e.g. 0-255 floats, decoder logits) would not fail later, they would
    just give a wrong FID, so they are rejected here.
    """
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 and not (flat_allowed and images.ndim == 2):
        expected = ("(N, H, W), (N, H, W, 1) or (N, D)" if flat_allowed
                    else "(N, H, W) or (N, H, W, 1)")
        raise ValueError(f"expected grayscale images shaped {expected}, got shape {images.shape}")
    if len(images) < 2:
        raise ValueError(f"need at least 2 images for a covariance, got {len(images)}")
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 (0-255) or float in [0, 1], "
                         f"got dtype {images.dtype}")
    low, high = images.min(), images.max()
    if not (0 <= low and high <= 1):  # also false for NaN and inf
        raise ValueError(f"float images must lie in [0, 1], got values from {low} to {high}")
    return images


def to_unit_float(images, dtype) -> np.ndarray:
    """Checked images as floats in [0, 1]."""
    if images.dtype == np.uint8:
        return images.astype(dtype) / dtype(255)
    return images.astype(dtype, copy=False)


def statistics_from_features(features, kind) -> Statistics:
    """Mean and covariance (np.cov, N - 1) of an (N, d) feature matrix, in float64: FID from
    the features that KID and PRDC use, with no second pass over the images. For "pixel" and
    "classifier" the very numbers of their statistics functions; Inception's streamed sums
    differ from np.cov in the last digits."""
    if kind not in FEATURE_KINDS:
        raise ValueError(f"kind must be one of {FEATURE_KINDS}, got {kind!r}")
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need an (N, d) feature matrix with N >= 2, got shape {features.shape}")
    return Statistics(mu=features.mean(axis=0), sigma=np.cov(features, rowvar=False),
                      n=len(features), features=kind)


def pixel_features(images) -> np.ndarray:
    """The flattened pixels in [0, 1], float64: the original metric's features."""
    images = check_images(images, flat_allowed=True)
    return to_unit_float(images, np.float64).reshape(len(images), -1)


def pixel_statistics(images) -> Statistics:
    """Mean and covariance of the flattened pixels in [0, 1], float64 (the original metric)."""
    return statistics_from_features(pixel_features(images), "pixel")


def pixel_fid(images_a, images_b) -> float:
    """FID on raw pixels, the figure the original repo reported."""
    return frechet_distance(pixel_statistics(images_a), pixel_statistics(images_b))


def weights_sha256(model) -> str:
    """Hash of all weight values: cache entries follow the weights, not the way they were loaded."""
    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()


def load_inception(weights="imagenet", dtype_policy="float32"):
    """InceptionV3 up to its 2048-d average pool; weights is "imagenet", None or a weights file.

    A file (e.g. Keras' cached inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5, or a
    `.weights.h5` written by model.save_weights) is how machines without internet get the
    ImageNet weights. The model carries `weights_sha256` for cache fingerprints. dtype_policy
    "mixed_bfloat16" computes its layers in bfloat16 (variables stay float32): see the README for
    its speed and how far its FIDs move.
    """
    import keras

    if weights is not None and weights != "imagenet":
        weights = os.fspath(weights)
    keras.config.set_dtype_policy(dtype_policy)
    try:
        model = keras.applications.InceptionV3(include_top=False, pooling="avg",
                                               input_shape=INCEPTION_INPUT_SHAPE, weights=weights)
    except Exception as error:  # Keras raises a bare Exception when the download fails
        reason = " ".join(str(error).split())
        raise InceptionUnavailable(
            f"cannot load Inception weights {weights!r}: {reason}") from error
    finally:
        keras.config.set_dtype_policy("float32")
    model.weights_sha256 = weights_sha256(model)
    return model


def inception_preprocess(images):
    """(B, H, W) grayscale in [0, 1] -> (B, 299, 299, 3) in [-1, 1], InceptionV3's input."""
    import tensorflow as tf

    resized = tf.image.resize(images[..., tf.newaxis], INCEPTION_INPUT_SHAPE[:2], method="bilinear")
    return tf.image.grayscale_to_rgb(resized) * 2.0 - 1.0


class StderrProgbar:
    """keras.utils.Progbar on stderr: stdout carries only results (`python fid.py A B > out`)."""

    def __init__(self, target, **options):
        import keras

        self.progbar = keras.utils.Progbar(target, **options)

    def update(self, current, values=None, finalize=None):
        with contextlib.redirect_stdout(sys.stderr):
            self.progbar.update(current, values, finalize)


def feature_extractor(model):
    """The model's traced images -> float32 features function, made once per model: tracing
    InceptionV3 takes seconds, and a run extracts three sets (test set, reconstructions, samples).
    XLA (jit_compile=True) is slower for Inception on CPU, so it stays off. The signature leaves
    batch and image size open, so the last, smaller batch reuses the graph."""
    import tensorflow as tf

    if not hasattr(model, "extract_features"):
        model.extract_features = tf.function(
            lambda batch: tf.cast(model(inception_preprocess(batch), training=False), tf.float32),
            input_signature=[tf.TensorSpec((None, None, None), tf.float32)])
    return model.extract_features


def inception_feature_batches(images, model, batch_size=50, verbose=True, skip_hint=""):
    """Inception pool features of checked images, one float32 batch at a time, with the progress
    on stderr: the statistics stream them, inception_features keeps them.

    skip_hint is appended to the time estimate printed after the first batch.
    """
    total = len(images)
    extract_features = feature_extractor(model)
    if verbose:
        print(f"fid: computing Inception features of {total} images (batch size {batch_size})",
              file=sys.stderr)
        extract_features(to_unit_float(images[:1], np.float32))  # trace first: timings leave it out
    progress = StderrProgbar(total, verbose=int(verbose), unit_name="image")
    start_time = time.perf_counter()
    for start in range(0, total, batch_size):
        batch = to_unit_float(images[start:start + batch_size], np.float32)
        yield extract_features(batch).numpy()
        done = start + len(batch)
        if verbose and start == 0:
            elapsed = time.perf_counter() - start_time
            print(f"fid: first batch took {elapsed:.1f} s, estimated total "
                  f"{format_duration(elapsed * total / done)}{skip_hint}", file=sys.stderr)
        progress.update(done)


def inception_statistics(images, model, batch_size=50, verbose=True, skip_hint="") -> Statistics:
    """Mean and covariance of Inception pool features, streamed in batches.

    Only float64 running sums of x and x x^T are kept, never the N x 2048 feature matrix.
    """
    images = check_images(images)
    total = len(images)
    feature_sum = np.zeros(model.output_shape[-1])
    outer_product_sum = np.zeros((feature_sum.size, feature_sum.size))
    for features in inception_feature_batches(images, model, batch_size, verbose, skip_hint):
        features = features.astype(np.float64)
        feature_sum += features.sum(axis=0)
        outer_product_sum += features.T @ features
    mu = feature_sum / total
    sigma = (outer_product_sum - total * np.outer(mu, mu)) / (total - 1)  # N-1, like numpy.cov
    return Statistics(mu=mu, sigma=sigma, n=total, features="inception")


def inception_features(images, model, batch_size=50, verbose=True, skip_hint="") -> np.ndarray:
    """The (N, 2048) float32 Inception pool features, for KID and PRDC."""
    images = check_images(images)
    return np.concatenate(list(inception_feature_batches(images, model, batch_size, verbose,
                                                         skip_hint)))


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/mnist-vae-fid, or ~/.cache/mnist-vae-fid."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "mnist-vae-fid"


def statistics_fingerprint(images: np.ndarray, features: str, network=None) -> str:
    """sha256 of what the statistics depend on: image bytes, shape, dtype, features, weights."""
    digest = hashlib.sha256()
    weights = network.weights_sha256 if features != "pixel" else ""
    if features != "pixel" and network.dtype_policy.name != "float32":
        weights += f"|{network.dtype_policy.name}"  # its features differ from float32's
    digest.update(f"{features}|{images.dtype.str}|{images.shape}|{weights}|".encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    return digest.hexdigest()


def save_statistics(path, statistics: Statistics, **extra_arrays):
    """Write statistics atomically, so an interrupted run never leaves a truncated file."""
    save_npz(path, mu=statistics.mu, sigma=statistics.sigma, n=statistics.n,
             features=statistics.features, **extra_arrays)


def read_npz(path) -> dict:
    """All arrays of an .npz file; every way it can be unreadable becomes a ValueError naming it."""
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"cannot read {path}: {error}") from error


def statistics_from_arrays(arrays: dict, path) -> Statistics:
    """Statistics from the arrays of a file written by save_statistics, validated."""
    missing = {"mu", "sigma", "n", "features"} - arrays.keys()
    if missing:
        raise ValueError(f"statistics file {path} lacks {', '.join(sorted(missing))}")
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    features = str(arrays["features"])
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"statistics file {path}: mu {mu.shape} and sigma {sigma.shape} "
                         f"do not match")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"statistics file {path} contains NaN or infinite values")
    if features not in FEATURE_KINDS:
        raise ValueError(f"statistics file {path} has unknown features {features!r}")
    return Statistics(mu=mu, sigma=sigma, n=int(arrays["n"]), features=features)


def feature_network(features, network):
    """The network that features need (None for pixels); the ImageNet Inception if none given."""
    if features not in FEATURE_KINDS:
        raise ValueError(f"features must be one of {FEATURE_KINDS}, got {features!r}")
    if features == "inception" and network is None:
        return load_inception()
    if features == "classifier" and network is None:
        raise ValueError("classifier features need a classifier "
                         "(load_or_train_classifier or load_classifier)")
    return network


def compute_statistics(images, features="pixel", network=None, batch_size=50,
                       cache_dir=None, verbose=True, skip_hint="") -> Statistics:
    """Statistics of one image set, cached in cache_dir when given (e.g. for the test set).

    network: for "inception" a model from load_inception (None loads the ImageNet weights), for
    "classifier" one from load_or_train_classifier or load_classifier. skip_hint ends the
    estimate of a long Inception pass (how the caller's user skips it).
    """
    network = feature_network(features, network)
    images = np.asarray(images)

    def compute():
        if features == "inception":  # streamed: never the N x 2048 feature matrix
            return inception_statistics(images, network, batch_size=batch_size, verbose=verbose,
                                        skip_hint=skip_hint)
        return statistics_from_features(compute_features(images, features, network), features)

    if cache_dir is None:
        return compute()
    fingerprint = statistics_fingerprint(images, features, network)
    return through_cache(
        Path(cache_dir) / f"{features}-{fingerprint}.npz", fingerprint, compute, "statistics",
        read=statistics_from_arrays,
        write=lambda path, statistics: save_statistics(path, statistics, fingerprint=fingerprint),
        verbose=verbose)


def through_cache(cache_path, fingerprint, compute, what, read, write, verbose):
    """read(arrays, cache_path) of cache_path when it holds this fingerprint, else compute() and
    write(cache_path, result). An unreadable entry (read raises ValueError) is recomputed and
    overwritten."""
    if cache_path.exists():
        try:
            arrays = read_npz(cache_path)
            if str(arrays.get("fingerprint")) == fingerprint:
                result = read(arrays, cache_path)
                if verbose:
                    print(f"fid: using cached {what} {cache_path}", file=sys.stderr)
                return result
        except ValueError as error:
            if verbose:
                print(f"fid: ignoring cache entry: {error}", file=sys.stderr)
    result = compute()
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    write(cache_path, result)
    return result


def compute_features(images, features, network=None, batch_size=50, cache_dir=None,
                     verbose=True, skip_hint="") -> np.ndarray:
    """The (N, d) feature matrix of one image set, for KID and PRDC (and FID through
    statistics_from_features), cached in cache_dir when given, so runs compute the test set's
    once. float64 for "pixel" (as pixel_statistics), float32 as the networks give them.

    network, batch_size and skip_hint: as for compute_statistics.
    """
    network = feature_network(features, network)
    images = np.asarray(images)

    def compute():
        if features == "pixel":
            return pixel_features(images)
        if features == "classifier":
            return classifier_features(images, network)
        return inception_features(images, network, batch_size=batch_size, verbose=verbose,
                                  skip_hint=skip_hint)

    if cache_dir is None:
        return compute()
    fingerprint = statistics_fingerprint(images, features, network)

    def read(arrays, cache_path):
        matrix = arrays.get("features")
        if matrix is None or matrix.ndim != 2 or len(matrix) != len(images):
            raise ValueError(f"{cache_path} holds no features of {len(images)} images")
        return matrix

    def write(cache_path, matrix):
        save_npz(cache_path, features=matrix, kind=features, fingerprint=fingerprint)

    return through_cache(Path(cache_dir) / f"{features}-features-{fingerprint}.npz", fingerprint,
                         compute, "features", read, write, verbose)


# ---- Kernel distance (KID) and precision, recall, density, coverage ----


def check_feature_sets(features_a, features_b):
    """Two (N, d) feature matrices of the same d, as finite float64."""
    a, b = (np.asarray(features, dtype=np.float64) for features in (features_a, features_b))
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"expected (N, d) feature matrices, got shapes {a.shape} and {b.shape}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("features contain NaN or infinite values")
    return a, b


def polynomial_kernel_sum(x, y):
    """Sum of KID's kernel k(x, y) = (x.y / d + 1)^3 over all pairs of rows, pairs of a row with
    itself left out when y is x (they would bias the within-set sum). Expanded as
    sum t^3 + 3 sum t^2 + 3 sum t + pairs with t = x.y / d, so that the 1000 x 1000 product
    matrix is passed over three times rather than six; x @ x.T is a symmetric product that
    NumPy computes at half the cost."""
    d = x.shape[1]
    products = x @ y.T
    squares = products * products
    total = (np.vdot(squares, products) / d**3 + 3 * squares.sum() / d**2
             + 3 * (x.sum(axis=0) @ y.sum(axis=0)) / d + products.size)
    if y is x:
        total -= np.sum((np.einsum("ij,ij->i", x, x) / d + 1) ** 3)
    return total


def kernel_distance(features_a, features_b, subsets=100, subset_size=KID_SUBSET_SIZE, seed=0,
                    reuse=None):
    """KID (Bińkowski et al. 2018): the unbiased estimate of MMD^2 with the kernel
    k(x, y) = (x.y / d + 1)^3, as (mean, standard deviation) over random subsets.

    Subsets are drawn without replacement, 100 of 1000 by default, as the reference code,
    torch-fidelity, torchmetrics and clean-fid do: the estimate is unbiased at any subset size,
    which sets its variance and its time (quadratic). The standard deviation is NumPy's (ddof=0,
    as torch-fidelity's, so one subset gives 0). Unbiased means it can be slightly negative.

    reuse: a dict kept between calls with the same features_a (a test set against its
    reconstructions, then its samples; see test_set_parts): a's within-subset sums are
    computed once per subset, and a's subsets repeat when the other sets have one size.
    """
    a, b = check_feature_sets(features_a, features_b)
    if subset_size > min(len(a), len(b)):
        raise ValueError(f"subset_size {subset_size} is larger than a set: "
                         f"{len(a)} and {len(b)} features")
    if subset_size < 2:
        raise ValueError(f"subset_size must be at least 2, got {subset_size}")
    rng = np.random.default_rng(seed)
    m = subset_size
    reuse = {} if reuse is None else reuse

    estimates = np.empty(subsets)
    for index in range(subsets):
        x_rows = rng.choice(len(a), m, replace=False)
        x, y = a[x_rows], b[rng.choice(len(b), m, replace=False)]
        key = "kid-" + hashlib.sha256(x_rows.tobytes()).hexdigest()[:32]
        if key not in reuse:
            reuse[key] = polynomial_kernel_sum(x, x)
        estimates[index] = ((reuse[key] + polynomial_kernel_sum(y, y)) / (m * (m - 1))
                            - 2 * polynomial_kernel_sum(x, y) / m**2)
    return float(estimates.mean()), float(estimates.std())


def fewest_images(kinds):
    """The fewest images each compared set needs for the metrics of these feature kinds: 2 for a
    covariance (FID) and KID's pairs; k + 1 for the k-NN metrics, which the classifier and
    Inception features add."""
    return NEAREST_NEIGHBOURS + 1 if set(kinds) - {"pixel"} else 2


def partial_distance_blocks(a, b, b_norms, block_size):
    """(start, ||b||^2 - 2 a.b for a[start:start + block_size] against every row of b): the
    squared Euclidean distances less each row's own ||a||^2, which the caller adds where it
    needs it. Memory block x len(b), never len(a) x len(b): every block is written into one
    buffer (a fresh 80 MB array per block would cost page faults), so each is used up before the
    next."""
    minus_2a = -2 * a  # exact, so the products are -2 a.b bit for bit
    buffer = np.empty((min(block_size, len(a)), len(b)))
    for start in range(0, len(a), block_size):
        rows = minus_2a[start:start + block_size]
        block = np.matmul(rows, b.T, out=buffer[:len(rows)])
        block += b_norms
        yield start, block


def kth_neighbour_radii(features, norms, k, block_size):
    """Squared distance of each sample to its k-th nearest neighbour in its own set, itself
    excluded, clipped at 0. The row's ||a||^2 is added after the selection: rounding is
    monotonic, so the k-th of the sums is the sum of the k-th, bit for bit."""
    radii = np.empty(len(features))
    for start, block in partial_distance_blocks(features, features, norms, block_size):
        rows = np.arange(len(block))
        block[rows, start + rows] = np.inf  # the sample itself
        block.partition(k - 1, axis=1)
        radii[start:start + len(block)] = block[:, k - 1]
    radii += norms
    return np.maximum(radii, 0, out=radii)


def precision_recall_density_coverage(real_features, fake_features, k=NEAREST_NEIGHBOURS,
                                      block_size=1000, reuse=None):
    """Precision and recall (Kynkäänniemi et al. 2019) with density and coverage (Naeem et al.
    2020), from balls around each sample reaching its k-th nearest neighbour in its own set:

    precision: share of fake samples in at least one real ball (fidelity);
    recall:    share of real samples in at least one fake ball (diversity);
    density:   real balls holding each fake sample, averaged, divided by k (about 1 when the
               sets come from one distribution; above 1 for samples crowding dense regions);
    coverage:  share of real samples whose ball holds a fake sample (diversity, robust to
               outlying fake samples, unlike recall).

    k=5 as Naeem et al. and prdc's example (with 10,000 samples a set) use; Kynkäänniemi et al.
    use 3, whose smaller balls give lower values. Balls are closed (<=), as in Kynkäänniemi et
    al.'s definition and code; prdc's code uses <. The two differ only on exact ties: duplicate
    samples, or a set against itself, where density is (k + 1) / k here and 1 in prdc.

    Distances are computed in float64 blocks of block_size rows (memory block_size x N, for
    10,000 samples 80 MB). A sample's radius and its comparisons with the other set come from
    the same row blocks, so a set against a copy of itself rounds the same both ways.
    reuse: a dict kept between calls with the same real_features, which then computes the real
    set's radii once (see test_set_parts).
    """
    real, fake = check_feature_sets(real_features, fake_features)
    if not 1 <= k < min(len(real), len(fake)):
        raise ValueError(f"k={k} needs more than k samples in each set and k >= 1, "
                         f"got {len(real)} real and {len(fake)} fake")
    real_norms, fake_norms = (np.einsum("ij,ij->i", x, x) for x in (real, fake))
    reuse = {} if reuse is None else reuse
    key = f"radii-k{k}-block{block_size}"
    if key not in reuse:
        reuse[key] = kth_neighbour_radii(real, real_norms, k, block_size)
    real_radii = reuse[key]
    fake_radii = kth_neighbour_radii(fake, fake_norms, k, block_size)
    balls_holding_fake = np.zeros(len(fake), dtype=np.int64)
    recalled, covered = np.empty(len(real), bool), np.empty(len(real), bool)
    for start, block in partial_distance_blocks(real, fake, fake_norms, block_size):
        stop = start + len(block)
        block += real_norms[start:stop, None]  # unclipped: a negative one is inside every ball
        in_real_balls = block <= real_radii[start:stop, None]  # (real, fake)
        balls_holding_fake += np.count_nonzero(in_real_balls, axis=0)
        covered[start:stop] = in_real_balls.any(axis=1)
        recalled[start:stop] = (block <= fake_radii).any(axis=1)
    return {"precision": float(np.mean(balls_holding_fake > 0)),
            "recall": float(recalled.mean()),
            "density": float(balls_holding_fake.sum() / (k * len(fake))),
            "coverage": float(covered.mean())}


@contextlib.contextmanager
def test_set_parts(real_features, cache_dir=None):
    """The reuse dict of kernel_distance and precision_recall_density_coverage for one real
    feature set, read from cache_dir and written back when the calls added to it: the test set's
    KID subset sums and k-NN radii are computed on the first run and read on later ones. A
    missing or unreadable entry starts empty; without a cache_dir the dict lives for the block."""
    if cache_dir is None:
        yield {}
        return
    real = np.ascontiguousarray(real_features)
    digest = hashlib.sha256(f"{real.dtype.str}|{real.shape}|".encode() + real.tobytes())
    path = Path(cache_dir) / f"kid-knn-parts-{digest.hexdigest()}.npz"
    try:
        reuse = read_npz(path) if path.exists() else {}
    except ValueError:
        reuse = {}
    known = set(reuse)
    yield reuse
    if set(reuse) != known:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_npz(path, **reuse)


# ---- Digit classifier ----

# How the classifier is trained: part of its cache key, so a change here trains a new one.
# These 3 epochs reach 99.2% test accuracy on MNIST (README, "Three FIDs").
CLASSIFIER_RECIPE = {"epochs": 3, "batch_size": 128, "learning_rate": 3e-3, "seed": 0}
CLASSIFIER_ESTIMATE_STEP = 20  # training step after which the training time is estimated
# Classifiers trained by the recipe and committed with the repository (MNIST's): a run on their
# training set loads one instead of training its own, so every machine measures with the same
# network (one trained on another CPU differs in its last bits, and so do its FIDs).
COMMITTED_CLASSIFIERS = Path(__file__).resolve().parent / "results" / "classifiers"
MIN_CLASSIFIER_IMAGE_SIDE = 10  # two 3x3 convolutions and two 2x2 poolings leave 1 pixel


def build_classifier(train_images, train_labels, seed=CLASSIFIER_RECIPE["seed"]):
    """LeNet-style classifier for images shaped like train_images, with one logit per label from 0
    to the largest in train_labels: Conv(32) - pool - Conv(64) - pool - Dense(128) - Dense logits.

    The FID uses its 128-d ReLU layer (the penultimate one, named "features"). Every layer is
    named and every initializer seeded, so the definition (part of the cache key) and the
    trained weights are the same in every process.
    """
    import keras

    height, width = check_images(train_images).shape[1:]
    if min(height, width) < MIN_CLASSIFIER_IMAGE_SIDE:
        raise ValueError(f"the digit classifier needs images of at least "
                         f"{MIN_CLASSIFIER_IMAGE_SIDE}x{MIN_CLASSIFIER_IMAGE_SIDE} pixels, "
                         f"got {height}x{width}")
    classes = int(np.max(train_labels)) + 1

    def initializer(index):
        return keras.initializers.GlorotUniform(seed=seed + index)

    inputs = keras.Input((height, width, 1), name="image")
    h = keras.layers.Conv2D(32, 3, activation="relu", kernel_initializer=initializer(1),
                            name="conv1")(inputs)
    h = keras.layers.MaxPooling2D(name="pool1")(h)
    h = keras.layers.Conv2D(64, 3, activation="relu", kernel_initializer=initializer(2),
                            name="conv2")(h)
    h = keras.layers.MaxPooling2D(name="pool2")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(128, activation="relu", kernel_initializer=initializer(3),
                           name="features")(h)
    logits = keras.layers.Dense(classes, kernel_initializer=initializer(4), name="logits")(h)
    return keras.Model(inputs, logits, name="digit_classifier")


def classifier_key(train_images, train_labels) -> str:
    """sha256 of what the trained classifier depends on: definition, recipe and training data."""
    definition = build_classifier(train_images, train_labels).to_json()
    digest = hashlib.sha256()
    digest.update(json.dumps([CLASSIFIER_RECIPE, definition], sort_keys=True).encode())
    for array in (train_images, train_labels):
        digest.update(f"|{array.dtype.str}|{array.shape}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


class ClassifierProgress:
    """A line estimating the whole training time after CLASSIFIER_ESTIMATE_STEP steps, then a
    progress bar over the steps of all epochs (one object serves the per-epoch fit calls): the
    step hook of a keras.callbacks.LambdaCallback."""

    def __init__(self, total_steps, skip_hint):
        self.total_steps, self.skip_hint, self.steps = total_steps, skip_hint, 0
        self.estimate_step = min(CLASSIFIER_ESTIMATE_STEP, total_steps)
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps == 1:  # the first step holds the tracing: the rates leave it out
            self.first_step_end = time.perf_counter()
            self.progbar = StderrProgbar(self.total_steps)
        if self.steps == self.estimate_step:
            now = time.perf_counter()
            rate = (now - self.first_step_end) / max(self.steps - 1, 1)
            estimate = now - self.start + rate * (self.total_steps - self.steps)
            print(f"fid: training the classifier takes about {format_duration(estimate)}"
                  f"{self.skip_hint}", file=sys.stderr)
        if self.steps >= self.estimate_step:  # the bar starts below the estimate
            self.progbar.update(self.steps)


def classifier_input(images):
    """Checked images as the classifier takes them: float32 in [0, 1], one channel."""
    return to_unit_float(images, np.float32)[..., None]


def train_classifier(train_images, train_labels, test_images, test_labels, verbose=True,
                     skip_hint=""):
    """The classifier trained from its fixed seed by CLASSIFIER_RECIPE; test_accuracy set on it.

    Each epoch sees the training set in a fresh seeded order (NumPy permutations, not TensorFlow's
    global seed), so the same data give the same weights whatever the caller seeded before.
    """
    train_images = check_images(train_images)
    train_labels = np.asarray(train_labels).astype(np.int32)
    if train_labels.shape != (len(train_images),):
        raise ValueError(f"labels shaped {train_labels.shape} do not match "
                         f"{len(train_images)} images")
    import keras
    import tensorflow as tf

    recipe = CLASSIFIER_RECIPE
    total_steps = recipe["epochs"] * math.ceil(len(train_images) / recipe["batch_size"])
    model = build_classifier(train_images, train_labels, recipe["seed"])
    schedule = keras.optimizers.schedules.CosineDecay(recipe["learning_rate"], total_steps)
    model.compile(keras.optimizers.Adam(schedule),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.optimizer.build(model.trainable_variables)  # else the first step is traced twice
    if verbose:
        print(f"fid: training the digit classifier on {len(train_images)} images "
              f"({recipe['epochs']} epochs, from seed {recipe['seed']})", file=sys.stderr)
    callbacks = ([keras.callbacks.LambdaCallback(
        on_train_batch_end=ClassifierProgress(total_steps, skip_hint).on_train_batch_end)]
                 if verbose else [])
    x = classifier_input(train_images)
    rng = np.random.default_rng(recipe["seed"])
    for epoch in range(recipe["epochs"]):
        order = rng.permutation(len(x))
        examples = tf.data.Dataset.from_tensor_slices((x[order], train_labels[order]))
        model.fit(examples.batch(recipe["batch_size"]), epochs=epoch + 1, initial_epoch=epoch,
                  shuffle=False, verbose=0, callbacks=callbacks)
    model.test_accuracy = classifier_accuracy(model, test_images, test_labels)
    model.weights_sha256 = weights_sha256(model)
    return model


def classifier_accuracy(model, images, labels) -> float:
    logits = in_batches(model, check_images(images), prepare=classifier_input)
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))


def load_classifier(path):
    """A classifier saved as .keras (ours, or any Keras model whose penultimate layer gives the
    features); test_accuracy comes from the file beside it that our cache writes, else None."""
    import keras

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such classifier file: {path}")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as error:
        reason = " ".join(str(error).split())[:200]
        raise ValueError(f"cannot load classifier {path}: {reason}") from error
    if len(model.inputs) != 1 or len(model.layers) < 2:
        raise ValueError(f"{path} is not a classifier with one input and a penultimate layer")
    info = path.with_suffix(".json")
    model.test_accuracy = (json.loads(info.read_text()).get("test_accuracy") if info.is_file()
                           else None)
    model.weights_sha256 = weights_sha256(model)
    return model


def load_or_train_classifier(train_images, train_labels, test_images, test_labels, cache_dir=None,
                             verbose=True, skip_hint=""):
    """The classifier of this training set: the committed one (COMMITTED_CLASSIFIERS) where there
    is one, else from cache_dir (default_cache_dir()), trained and cached first if there is none.
    Its file is classifier-<key>.keras; classifier-<key>.json beside it (written last: the commit
    point) records the key and test accuracy."""
    cache_dir = Path(cache_dir or default_cache_dir())
    key = classifier_key(np.asarray(train_images), np.asarray(train_labels))
    path = cache_dir / f"classifier-{key}.keras"
    for known, what in ((COMMITTED_CLASSIFIERS / path.name, "committed"), (path, "cached")):
        if known.is_file() and known.with_suffix(".json").is_file():
            try:
                model = load_classifier(known)
                if verbose:
                    print(f"fid: using {what} classifier {known} "
                          f"(test accuracy {model.test_accuracy:.2%})", file=sys.stderr)
                return model
            except (ValueError, OSError) as error:  # a damaged entry is retrained and replaced
                if verbose:
                    print(f"fid: ignoring {what} classifier: {error}", file=sys.stderr)
    start = time.perf_counter()
    model = train_classifier(train_images, train_labels, test_images, test_labels, verbose,
                             skip_hint)
    seconds = time.perf_counter() - start
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, model.save)
    atomic_write(path.with_suffix(".json"), lambda temporary: Path(temporary).write_text(
        json.dumps({"key": key, "test_accuracy": model.test_accuracy,
                    "training_images": len(train_images), "training_seconds": round(seconds, 1),
                    "recipe": CLASSIFIER_RECIPE}, indent=2) + "\n"))
    if verbose:
        print(f"fid: classifier test accuracy {model.test_accuracy:.2%}, "
              f"trained in {seconds:.0f} s, cached in {path}", file=sys.stderr)
    return model


def classifier_features(images, classifier, batch_size=1000) -> np.ndarray:
    """The classifier's penultimate-layer activations, (N, d) float32."""
    images = check_images(images)
    if images.shape[1:] != tuple(classifier.inputs[0].shape[1:3]):
        height, width = classifier.inputs[0].shape[1:3]
        raise ValueError(f"the classifier takes {height}x{width} images, "
                         f"got {images.shape[1]}x{images.shape[2]}")
    import keras

    extractor = keras.Model(classifier.input, classifier.layers[-2].output)
    features = in_batches(extractor, images, batch_size, prepare=classifier_input)
    return features.reshape(len(images), -1)


def classifier_statistics(images, classifier, batch_size=1000) -> Statistics:
    """Mean and covariance of the classifier's penultimate-layer activations, in float64."""
    return statistics_from_features(classifier_features(images, classifier, batch_size),
                                    "classifier")


# ---- Command line ----


def read_png_folder(folder: Path, max_samples=None) -> np.ndarray:
    """PNGs of a folder in name order as (N, H, W) float32 in [0, 1]; RGB becomes luminance."""
    paths = sorted(path for path in folder.iterdir() if path.suffix.lower() == ".png")
    if not paths:
        raise ValueError(f"no PNG images in folder {folder}")
    images = []
    for path in paths[:max_samples]:
        try:
            image = matplotlib.image.imread(path)
        except (OSError, ValueError, SyntaxError) as error:  # Pillow's error for a broken PNG
            raise ValueError(f"cannot read image {path}: {error}") from error
        if image.ndim == 3 and image.shape[-1] >= 3:
            image = np.clip(image[..., :3] @ LUMINANCE_WEIGHTS, 0, 1).astype(np.float32)
        elif image.ndim == 3:  # grayscale with alpha
            image = image[..., 0]
        if images and image.shape != images[0].shape:
            raise ValueError(f"{path} is {image.shape[0]}x{image.shape[1]} but {paths[0]} is "
                             f"{images[0].shape[0]}x{images[0].shape[1]}; "
                             f"a set must share one size")
        images.append(image)
    return np.stack(images)


def choose_array(arrays: dict, key, path) -> np.ndarray:
    """A file's only array, whatever its name; else the one named by key."""
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    if key not in arrays:
        raise ValueError(f"{path} has no array {key!r}; "
                         f"its arrays are: {', '.join(arrays) or 'none'} (choose one with --key)")
    return arrays[key]


def read_input(path: str, key="images", max_samples=None):
    """Images (an .npz or a folder of PNGs) or Statistics (an .npz from --save-stats)."""
    path = Path(path)
    if path.is_dir():
        return read_png_folder(path, max_samples)
    if not path.exists():
        raise ValueError(f"no such file or folder: {path}")
    arrays = read_npz(path)
    if {"mu", "sigma"} <= arrays.keys():
        return statistics_from_arrays(arrays, path)
    return choose_array(arrays, key, path)[:max_samples]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="fid.py",
        description="Fréchet distance between two image sets in Inception, classifier or pixel "
                    "features. Each of A and B is an .npz of images (uint8 0-255 or float in "
                    "[0, 1]), a folder of PNG images, or a statistics file written by "
                    "--save-stats. --kid and --prdc add kernel distance and precision, recall, "
                    "density and coverage on the same features, from images only.")
    parser.add_argument("a", metavar="A", help="first set; with --save-stats: the images")
    parser.add_argument("b", metavar="B", help="second set; with --save-stats: the .npz to write")
    parser.add_argument("--save-stats", action="store_true",
                        help="write the statistics (mu, sigma, n, features) of A to B")
    parser.add_argument("--features", choices=FEATURE_KINDS, default="inception",
                        help="Inception pool features (the standard FID), the penultimate layer "
                             "of a digit classifier trained on the data (see --classifier), or raw "
                             "pixels, the original repo's metric (default: %(default)s)")
    parser.add_argument("--classifier", metavar="PATH",
                        help="with --features classifier: a .keras classifier, such as one "
                             "that vae.py or conv_vae.py trained on other data and cached; "
                             "default: MNIST's committed one")
    parser.add_argument("--inception-weights", default="imagenet", metavar="WEIGHTS",
                        help='"imagenet" (downloaded by Keras) or a path to a Keras weights file, '
                             "for machines without internet (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=50,
                        help="images per Inception forward pass (default: %(default)s)")
    parser.add_argument("--max-samples", type=positive_int, metavar="N",
                        help="use only the first N images of each set (default: all; "
                             "statistics files are used as they are)")
    parser.add_argument("--key", default="images",
                        help="array to read from an .npz that holds several; a file with a single "
                             "array is read whatever its name (default: %(default)s)")
    parser.add_argument("--kid", action="store_true",
                        help="also print the kernel distance (KID): mean ± standard deviation "
                             "over random subsets")
    parser.add_argument("--kid-subsets", type=positive_int, default=100, metavar="N",
                        help="random subsets the KID averages over (default: %(default)s)")
    parser.add_argument("--kid-subset-size", type=positive_int, metavar="N",
                        help=f"samples in each KID subset (default: {KID_SUBSET_SIZE}, or the "
                             "smaller set's size if a set is smaller)")
    parser.add_argument("--prdc", action="store_true",
                        help="also print precision, recall, density and coverage, with A as the "
                             "real set and B as the generated one")
    parser.add_argument("--prdc-k", type=positive_int, default=5, metavar="K",
                        help="nearest neighbour whose distance is a sample's radius "
                             "(default: %(default)s)")
    return parser


def command_line_classifier(path):
    """--classifier PATH, else MNIST's committed classifier: FIDs in its features compare across
    machines and with the committed runs' (a classifier of other data is used only when named)."""
    if path is None:
        committed = sorted(COMMITTED_CLASSIFIERS.glob("classifier-*.keras"))
        if not committed:
            raise ValueError(f"no classifier committed in {COMMITTED_CLASSIFIERS}: pass "
                             "--classifier PATH to a .keras classifier (vae.py and conv_vae.py "
                             f"cache the one of their data in {default_cache_dir()})")
        path = committed[0]
        print(f"fid: using MNIST's committed classifier {path} (--classifier chooses another)",
              file=sys.stderr)
    classifier = load_classifier(path)
    if classifier.test_accuracy is not None:
        print(f"fid: classifier test accuracy {classifier.test_accuracy:.2%}", file=sys.stderr)
    return classifier


def kid_subset_size(args, paths, inputs):
    """The KID subset size (None without --kid), after checking that --kid and --prdc have two
    image sets large enough for them, before the slow part. It defaults to KID_SUBSET_SIZE, or
    the smaller set's size, with a note."""
    requested = [flag for flag, wanted in (("--kid", args.kid), ("--prdc", args.prdc)) if wanted]
    if not requested:
        return None
    if args.save_stats:
        raise ValueError(f"--save-stats writes one set's statistics: "
                         f"{' and '.join(requested)} cannot go with it")
    for path, item in zip(paths, inputs):
        if isinstance(item, Statistics):
            raise ValueError(f"{path} is a statistics file: with {' and '.join(requested)}, "
                             f"pass images (they need the features of every image)")
    sizes = [len(item) for item in inputs]
    if args.prdc and args.prdc_k >= min(sizes):
        raise ValueError(f"--prdc-k {args.prdc_k} needs more than {args.prdc_k} images in each "
                         f"set, got {sizes[0]} and {sizes[1]}")
    if not args.kid:
        return None
    if args.kid_subset_size is None:
        size = min(KID_SUBSET_SIZE, *sizes)
        if size < KID_SUBSET_SIZE:
            print(f"fid: KID subsets of {size} samples, the smaller set's size "
                  f"(default {KID_SUBSET_SIZE})", file=sys.stderr)
        return size
    if args.kid_subset_size > min(sizes):
        raise ValueError(f"--kid-subset-size {args.kid_subset_size} is larger than a set: "
                         f"{sizes[0]} and {sizes[1]} images")
    return args.kid_subset_size


def run_command(args) -> None:
    """What main does after parsing; input problems raise ValueError or InceptionUnavailable."""
    paths = [args.a] if args.save_stats else [args.a, args.b]
    inputs = [read_input(path, args.key, args.max_samples) for path in paths]
    for path, item in zip(paths, inputs):
        if isinstance(item, Statistics) and item.features != args.features:
            raise ValueError(f"{path} holds {item.features} statistics, "
                             f"but --features is {args.features}")
        if not isinstance(item, Statistics):  # fail before the slow part, not after it
            try:
                check_images(item, flat_allowed=args.features == "pixel")
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from error
    subset_size = kid_subset_size(args, paths, inputs)
    if args.save_stats and not Path(args.b).parent.is_dir():
        raise ValueError(f"cannot write {args.b}: its folder does not exist")
    network = None
    if not all(isinstance(item, Statistics) for item in inputs):
        if args.features != "pixel":
            start_tensorflow()
        if args.features == "inception":
            try:
                network = load_inception(args.inception_weights)
            except InceptionUnavailable as error:
                offline = ("; without a network, --inception-weights FILE loads a local copy, and "
                           "--features classifier or --features pixel need no download"
                           if args.inception_weights == "imagenet" else "")
                raise InceptionUnavailable(f"{error}{offline}") from None
        elif args.features == "classifier":
            network = command_line_classifier(args.classifier)
    if args.kid or args.prdc:  # one feature pass for all metrics
        features = [compute_features(item, args.features, network, args.batch_size)
                    for item in inputs]
        statistics = [statistics_from_features(matrix, args.features) for matrix in features]
    else:
        statistics = [item if isinstance(item, Statistics) else
                      compute_statistics(item, args.features, network, args.batch_size)
                      for item in inputs]
    if args.save_stats:
        save_statistics(args.b, statistics[0])
        print(f"saved {args.features} statistics of {statistics[0].n} images to {args.b}")
        return
    # + 0.0: no "-0.0000" from round-off
    distance = round(frechet_distance(*statistics), 4) + 0.0
    print(f"FID ({args.features}): {distance:.4f}")
    if args.kid:
        mean, std = kernel_distance(*features, args.kid_subsets, subset_size)
        print(f"KID ({args.features}): {mean:.5g} ± {std:.2g}")
    if args.prdc:
        metrics = precision_recall_density_coverage(*features, k=args.prdc_k)
        print("  ".join(f"{name} {value:.3f}" for name, value in metrics.items())
              + f" (k={args.prdc_k})")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def work():
        try:
            run_command(args)
        except (ValueError, OSError, InceptionUnavailable) as error:
            raise UsageError(" ".join(str(error).split())) from None
    return exit_code(parser.prog, work)


if __name__ == "__main__":
    sys.exit(main())
