"""Fréchet distances (FID, Heusel et al. 2017) between two sets of MNIST-like images on the pool
features of Keras' InceptionV3 ("inception": not pytorch-fid's weights, so the numbers compare
with each other, not papers), on the penultimate layer of a digit classifier trained on the data
("classifier", as TTUR's authors advise for data unlike ImageNet; MNIST's is committed, so its
FIDs compare across machines), or on raw pixels ("pixel", the original repo's metric). On the same
features: the kernel distance (KID, Bińkowski et al. 2018) and precision, recall, density and
coverage (Kynkäänniemi et al. 2019, Naeem et al. 2020), which tell fidelity from diversity.

    python fid.py A B                          FID between two image sets or statistics files
    python fid.py --save-stats IMAGES OUT.npz  save statistics to compare against later
    python fid.py REAL FAKE --kid --prdc       add KID and precision/recall/density/coverage
"""

import argparse
import contextlib
import difflib
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import matplotlib.image
import numpy as np
import scipy.linalg

# TensorFlow and Keras are imported where a network runs: pixel FIDs do not wait for them.


def frechet_distance(a, b, eps=1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)) of two Statistics, as in pytorch-fid."""
    if a.features != b.features:
        raise ValueError(f"cannot compare {a.features} statistics with {b.features} statistics")
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    # Pixel covariances are singular (MNIST's border pixels never change), so scipy would warn
    # on every call: finiteness and the imaginary part are checked here instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma)
        if not np.isfinite(covmean).all():
            print(f"fid: sqrtm of the covariance product is not finite (near-singular); "
                  f"retrying with {eps} added to both diagonals", file=sys.stderr)
            offset = np.eye(a.sigma.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset))
    if not np.isfinite(covmean).all():
        raise ValueError("sqrtm of the covariance product is not finite, even with eps added")
    if np.iscomplexobj(covmean):
        imaginary = np.abs(np.diagonal(covmean).imag).max()
        if imaginary > 1e-3:  # pytorch-fid's tolerance
            raise ValueError(f"sqrtm of the covariance product has an imaginary component of "
                             f"{imaginary:.3g} on its diagonal: are both covariances PSD?")
        covmean = covmean.real
    mean_difference = a.mu - b.mu
    return float(mean_difference @ mean_difference
                 + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


# ---- Image statistics and features (pixels, the digit classifier, Inception), cached ----

FEATURE_KINDS = ("pixel", "classifier", "inception")


class Statistics(NamedTuple):
    """The Gaussian fitted to an image set's features: all FID needs, all --save-stats writes."""
    mu: np.ndarray  # float64, (d,)
    sigma: np.ndarray  # float64, (d, d)
    n: int
    features: str  # one of FEATURE_KINDS


def check_images(images, *, flat_allowed=False) -> np.ndarray:
    """Images as (N, H, W) (or (N, D) if flat_allowed), uint8 or float in [0, 1] (not logits)."""
    images = np.asarray(images)
    images = images[..., 0] if images.ndim == 4 and images.shape[-1] == 1 else images
    if images.ndim != 3 and not (flat_allowed and images.ndim == 2):
        shapes = ("(N, H, W), (N, H, W, 1) or (N, D)" if flat_allowed
                  else "(N, H, W) or (N, H, W, 1)")
        raise ValueError(f"expected grayscale images shaped {shapes}, got shape {images.shape}")
    if len(images) < 2:
        raise ValueError(f"need at least 2 images for a covariance, got {len(images)}")
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 (0-255) or float in [0, 1], got {images.dtype}")
    if images.dtype != np.uint8 and not (0 <= images.min() and images.max() <= 1):  # NaN too
        raise ValueError(f"float images must lie in [0, 1], got {images.min()} to {images.max()}")
    return images


def to_unit_float(images, dtype) -> np.ndarray:
    """Checked images as floats in [0, 1]."""
    if images.dtype == np.uint8:
        return images.astype(dtype) / dtype(255)
    return images.astype(dtype, copy=False)


def statistics_from_features(features, kind) -> Statistics:
    """Mean and covariance (np.cov, N - 1) of an (N, d) feature matrix, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if kind not in FEATURE_KINDS or features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need an (N >= 2, d) feature matrix and a kind of {FEATURE_KINDS}, "
                         f"got {features.shape} and {kind!r}")
    return Statistics(features.mean(axis=0), np.cov(features, rowvar=False), len(features), kind)


def pixel_fid(images_a, images_b) -> float:
    """FID on raw pixels, the figure the original repo reported."""
    return frechet_distance(*(statistics_from_features(compute_features(images, "pixel"), "pixel")
                              for images in (images_a, images_b)))


class InceptionUnavailable(Exception):
    """The Inception weights could not be loaded (offline, missing or bad file)."""


def weights_sha256(model) -> str:
    """Hash of all weight values: cache entries follow the weights, not how they were loaded."""
    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()


def load_inception(weights="imagenet", dtype_policy="float32"):
    """InceptionV3 to its 2048-d pool; weights "imagenet" (downloaded), None (random) or a file."""
    import keras
    weights = weights if weights in (None, "imagenet") else os.fspath(weights)
    keras.config.set_dtype_policy(dtype_policy)
    try:
        model = keras.applications.InceptionV3(include_top=False, pooling="avg",
                                               input_shape=(299, 299, 3), weights=weights)
    except Exception as error:  # Keras raises a bare Exception when the download fails
        raise InceptionUnavailable(f"cannot load Inception weights {weights!r}: "
                                   f"{' '.join(str(error).split())}") from error
    finally:
        keras.config.set_dtype_policy("float32")
    model.weights_sha256 = weights_sha256(model)
    return model


def inception_preprocess(images):
    """(B, H, W) grayscale in [0, 1] -> (B, 299, 299, 3) in [-1, 1], InceptionV3's input."""
    import tensorflow as tf
    resized = tf.image.resize(images[..., tf.newaxis], (299, 299), method="bilinear")
    return tf.image.grayscale_to_rgb(resized) * 2.0 - 1.0


def inception_features(images, model, batch_size=50, verbose=True) -> np.ndarray:
    """(N, 2048) float32 pool features of checked images, traced once per model for any batch."""
    import tensorflow as tf
    if not hasattr(model, "extract_features"):
        model.extract_features = tf.function(
            lambda batch: tf.cast(model(inception_preprocess(batch), training=False), tf.float32),
            input_signature=[tf.TensorSpec((None, None, None), tf.float32)])
    if verbose:
        print(f"fid: computing Inception features of {len(images)} images "
              f"(batch size {batch_size})", file=sys.stderr)
    bar, batches = progress_bar(len(images), verbose=verbose), []
    for start in range(0, len(images), batch_size):
        batch = to_unit_float(images[start:start + batch_size], np.float32)
        batches.append(model.extract_features(batch).numpy())
        bar.update(start + len(batch))
    return np.concatenate(batches)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/mnist-vae-fid, or ~/.cache/mnist-vae-fid."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mnist-vae-fid"


def fingerprint(array, network=None) -> str:
    """sha256 of an array (bytes, shape, dtype) and of the network's weights and dtype policy."""
    array = np.ascontiguousarray(array)
    weights = "" if network is None else network.weights_sha256
    if network is not None and network.dtype_policy.name != "float32":
        weights += f"|{network.dtype_policy.name}"  # its features differ from float32's
    digest = hashlib.sha256(f"{array.dtype.str}|{array.shape}|{weights}|".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def compute_features(images, kind, network=None, batch_size=50, cache_dir=None,
                     verbose=True) -> np.ndarray:
    """The (N, d) features of one image set: float64 pixels, or float32 from network (Inception's,
    ImageNet's if None; the classifier's), kept in cache_dir so runs compute the test set's once."""
    if kind not in FEATURE_KINDS or (kind == "classifier" and network is None):
        raise ValueError(f"kind must be one of {FEATURE_KINDS} (classifier with a network), "
                         f"got {kind!r}")
    network = load_inception() if kind == "inception" and network is None else network
    images = np.asarray(images)
    path = cache_dir and Path(cache_dir, f"{kind}-features-{fingerprint(images, network)}.npz")
    if path and path.exists():
        try:
            features = read_npz(path)["features"]
            if verbose:
                print(f"fid: using cached features {path}", file=sys.stderr)
            return features
        except (ValueError, KeyError) as error:
            if verbose:
                print(f"fid: ignoring cache entry {path}: {error}", file=sys.stderr)
    if kind == "pixel":
        images = check_images(images, flat_allowed=True)
        features = to_unit_float(images, np.float64).reshape(len(images), -1)
    elif kind == "classifier":
        features = classifier_features(images, network)
    else:
        features = inception_features(check_images(images), network, batch_size, verbose)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_npz(path, features=features)
    return features


# ---- Kernel distance (KID) and precision, recall, density, coverage ----

KID_SUBSET_SIZE = 1000  # as in torch-fidelity and the KID authors' code
NEAREST_NEIGHBOURS = 5  # k of precision / recall / density / coverage


def check_feature_sets(features_a, features_b):
    """Two (N, d) feature matrices of the same d, as finite float64."""
    a, b = (np.asarray(features, dtype=np.float64) for features in (features_a, features_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected (N, d) feature matrices of one d, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("features contain NaN or infinite values")
    return a, b


def polynomial_kernel_sum(x, y):
    """Sum of KID's kernel (x.y / d + 1)^3 over all pairs of rows (but a row with itself when y is
    x), as sum t^3 + 3 sum t^2 + 3 sum t + pairs (t = x.y / d): three passes over x y^T, not six."""
    d = x.shape[1]
    products = x @ y.T
    squares = products * products
    total = (np.vdot(squares, products) / d**3 + 3 * squares.sum() / d**2
             + 3 * (x.sum(axis=0) @ y.sum(axis=0)) / d + products.size)
    if y is x:
        total -= np.sum((np.einsum("ij,ij->i", x, x) / d + 1) ** 3)
    return total


def kernel_distance(features_a, features_b, subsets=100, subset_size=None, seed=0):
    """KID, the unbiased (so possibly negative) MMD^2 with kernel (x.y / d + 1)^3, as (mean, ddof=0
    std) over random subsets, as in torch-fidelity."""
    a, b = check_feature_sets(features_a, features_b)
    subset_size = subset_size or min(KID_SUBSET_SIZE, len(a), len(b))
    if subset_size > min(len(a), len(b)):
        raise ValueError(f"subset_size {subset_size} is larger than a set: "
                         f"{len(a)} and {len(b)} features")
    if subset_size < 2:
        raise ValueError(f"subset_size must be at least 2, got {subset_size}")
    rng, m = np.random.default_rng(seed), subset_size
    estimates = np.empty(subsets)
    for index in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        estimates[index] = ((polynomial_kernel_sum(x, x) + polynomial_kernel_sum(y, y))
                            / (m * (m - 1)) - 2 * polynomial_kernel_sum(x, y) / m**2)
    return float(estimates.mean()), float(estimates.std())


def kid_text(mean, std):
    """KID as fid.py and a run's summary print it: the unbiased MMD^2 in the features' own units
    (no scale factor), and its standard deviation over the subsets."""
    return f"{mean:.4g} ± {std:.2g} (MMD², features unscaled)"


def fewest_images(kinds):
    """The fewest images a compared set needs: 2 for FID and KID, k + 1 for the k-NN metrics."""
    return NEAREST_NEIGHBOURS + 1 if set(kinds) - {"pixel"} else 2


def partial_distance_blocks(a, b, b_norms, block_size):
    """(start, ||b||^2 - 2 a.b) for each block of rows of a, in one block_size x len(b) buffer."""
    minus_2a = -2 * a  # exact, so the products are -2 a.b bit for bit
    buffer = np.empty((min(block_size, len(a)), len(b)))
    for start in range(0, len(a), block_size):
        rows = minus_2a[start:start + block_size]
        block = np.matmul(rows, b.T, out=buffer[:len(rows)])
        block += b_norms
        yield start, block


def kth_neighbour_radii(features, norms, k, block_size):
    """Squared distance of each sample to its k-th nearest neighbour in its own set, at least 0."""
    radii = np.empty(len(features))
    for start, block in partial_distance_blocks(features, features, norms, block_size):
        rows = np.arange(len(block))
        block[rows, start + rows] = np.inf  # the sample itself
        block.partition(k - 1, axis=1)
        radii[start:start + len(block)] = block[:, k - 1]
    radii += norms  # after the selection: rounding is monotonic, so the same bits
    return np.maximum(radii, 0, out=radii)


def precision_recall_density_coverage(real_features, fake_features, k=NEAREST_NEIGHBOURS,
                                      block_size=1000):
    """Precision and recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020)
    from closed balls reaching each sample's k-th nearest neighbour in its own set: the share of
    fake samples in a real ball (fidelity), of real samples in a fake ball (diversity), the real
    balls holding each fake sample over k (about 1 for one distribution; (k + 1) / k for a set
    against itself, 1 with prdc's open balls), and the share of real balls holding a fake one
    (diversity, robust to outliers)."""
    real, fake = check_feature_sets(real_features, fake_features)
    if not 1 <= k < min(len(real), len(fake)):
        raise ValueError(f"k={k} needs more than k samples in each set and k >= 1, "
                         f"got {len(real)} real and {len(fake)} fake")
    real_norms, fake_norms = (np.einsum("ij,ij->i", x, x) for x in (real, fake))
    real_radii = kth_neighbour_radii(real, real_norms, k, block_size)
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
    return {"precision": float(np.mean(balls_holding_fake > 0)), "recall": float(recalled.mean()),
            "density": float(balls_holding_fake.sum() / (k * len(fake))),
            "coverage": float(covered.mean())}


# ---- Digit classifier ----

# How the classifier is trained: part of its cache key, so a change here trains a new one.
CLASSIFIER_RECIPE = {"epochs": 3, "batch_size": 128, "learning_rate": 3e-3, "seed": 0}
# Classifiers trained by the recipe and committed (MNIST's), so every machine measures with the
# same network (one trained on another CPU differs in its last bits, and so do its FIDs).
COMMITTED_CLASSIFIERS = Path(__file__).resolve().parent / "results" / "classifiers"
MIN_CLASSIFIER_IMAGE_SIDE = 10  # two 3x3 convolutions and two 2x2 poolings leave 1 pixel


def build_classifier(train_images, train_labels, seed=CLASSIFIER_RECIPE["seed"]):
    """LeNet-style classifier into labels 0 to the largest; "features" is its penultimate layer.
    Named layers and seeded initializers: the same definition and weights in every process."""
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


def classifier_input(images):
    """Checked images as the classifier takes them: float32 in [0, 1], one channel."""
    return to_unit_float(images, np.float32)[..., None]


def train_classifier(train_images, train_labels, test_images, test_labels, verbose=True):
    """The classifier trained by CLASSIFIER_RECIPE, with test_accuracy set. Each epoch's order is a
    seeded NumPy permutation, so the weights depend on the data only."""
    import keras
    import tensorflow as tf
    images, labels = check_images(train_images), np.asarray(train_labels).astype(np.int32)
    if labels.shape != (len(images),):
        raise ValueError(f"labels shaped {labels.shape} do not match {len(images)} images")
    recipe = CLASSIFIER_RECIPE
    steps = recipe["epochs"] * math.ceil(len(images) / recipe["batch_size"])
    model = build_classifier(images, labels, recipe["seed"])
    schedule = keras.optimizers.schedules.CosineDecay(recipe["learning_rate"], steps)
    model.compile(keras.optimizers.Adam(schedule),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.optimizer.build(model.trainable_variables)  # else the first step is traced twice
    if verbose:
        print(f"fid: training the digit classifier on {len(images)} images "
              f"({recipe['epochs']} epochs, from seed {recipe['seed']})", file=sys.stderr)
    bar = progress_bar(steps, "step", verbose)  # over the steps of all epochs
    count_steps = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: bar.add(1))
    x, rng = classifier_input(images), np.random.default_rng(recipe["seed"])
    for epoch in range(recipe["epochs"]):
        order = rng.permutation(len(x))
        examples = tf.data.Dataset.from_tensor_slices((x[order], labels[order]))
        model.fit(examples.batch(recipe["batch_size"]), epochs=epoch + 1, initial_epoch=epoch,
                  shuffle=False, verbose=0, callbacks=[count_steps])
    model.test_accuracy = classifier_accuracy(model, test_images, test_labels)
    model.weights_sha256 = weights_sha256(model)
    return model


def classifier_accuracy(model, images, labels) -> float:
    logits = in_batches(model, check_images(images), prepare=classifier_input)
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))


def classifier_features(images, classifier) -> np.ndarray:
    """The classifier's penultimate-layer activations, (N, d) float32."""
    import keras
    images, (height, width) = check_images(images), classifier.inputs[0].shape[1:3]
    if images.shape[1:] != (height, width):
        raise ValueError(f"the classifier takes {height}x{width} images, "
                         f"got {images.shape[1]}x{images.shape[2]}")
    extractor = keras.Model(classifier.input, classifier.layers[-2].output)
    return in_batches(extractor, images, prepare=classifier_input).reshape(len(images), -1)


def load_classifier(path):
    """A .keras classifier, with test_accuracy from the .json our cache writes beside it."""
    model = load_model(path, compile=False)
    if len(model.inputs) != 1 or len(model.layers) < 2:
        raise ValueError(f"{path} is not a classifier with one input and a penultimate layer")
    info = Path(path).with_suffix(".json")
    model.test_accuracy = (json.loads(info.read_text()).get("test_accuracy") if info.is_file()
                           else None)
    model.weights_sha256 = weights_sha256(model)
    return model


def load_or_train_classifier(train_images, train_labels, test_images, test_labels, cache_dir=None,
                             verbose=True):
    """The classifier of this training set: committed, else cached in cache_dir, else trained and
    cached as classifier-<key>.keras, the .json beside it written last (the commit point)."""
    key = classifier_key(np.asarray(train_images), np.asarray(train_labels))
    path = Path(cache_dir or default_cache_dir()) / f"classifier-{key}.keras"
    for known, what in ((COMMITTED_CLASSIFIERS / path.name, "committed"), (path, "cached")):
        if known.is_file() and known.with_suffix(".json").is_file():
            try:
                model = load_classifier(known)
                if verbose:
                    print(f"fid: using {what} classifier {known} "
                          f"(test accuracy {model.test_accuracy:.2%})", file=sys.stderr)
                return model
            except (UsageError, ValueError, OSError) as error:  # trained again and replaced
                if verbose:
                    print(f"fid: ignoring {what} classifier: {error}", file=sys.stderr)
    model = train_classifier(train_images, train_labels, test_images, test_labels, verbose)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, model.save)
    record = {"key": key, "test_accuracy": model.test_accuracy,
              "training_images": len(train_images), "recipe": CLASSIFIER_RECIPE}
    atomic_write(path.with_suffix(".json"),
                 lambda temporary: Path(temporary).write_text(json.dumps(record, indent=2) + "\n"))
    if verbose:
        print(f"fid: classifier test accuracy {model.test_accuracy:.2%}, cached in {path}",
              file=sys.stderr)
    return model


# ---- Command line ----


def read_input(path, key="images", max_samples=None):
    """Images (a folder of PNGs, an .npz's only array or its `key`) or --save-stats' Statistics."""
    path = Path(path)
    if path.is_dir():
        pngs = sorted(png for png in path.iterdir() if png.suffix.lower() == ".png")
        images = [read_png(png) for png in pngs[:max_samples]]
        if not images:
            raise ValueError(f"no PNG images in folder {path}")
        if len({image.shape for image in images}) > 1:
            raise ValueError(f"the PNG images of {path} differ in size; a set must share one size")
        return np.stack(images)
    if not path.exists():
        raise ValueError(f"no such file or folder: {path}")
    arrays = read_npz(path)
    if set(Statistics._fields) <= arrays.keys():  # written by --save-stats
        return Statistics(arrays["mu"], arrays["sigma"], int(arrays["n"]), str(arrays["features"]))
    if len(arrays) == 1:
        return next(iter(arrays.values()))[:max_samples]
    if key not in arrays:
        raise ValueError(f"{path} has no array {key!r}; its arrays are: "
                         f"{', '.join(arrays) or 'none'} (choose one with --key)")
    return arrays[key][:max_samples]


def read_png(path) -> np.ndarray:
    """A PNG image as (H, W) float32 in [0, 1]: RGB as luminance (ITU-R BT.601), alpha dropped."""
    try:
        image = matplotlib.image.imread(path)
    except (OSError, ValueError, SyntaxError) as error:  # Pillow's error for a broken PNG
        raise ValueError(f"cannot read image {path}: {error}") from error
    if image.ndim == 3 and image.shape[-1] >= 3:
        return np.clip(image[..., :3] @ [0.299, 0.587, 0.114], 0, 1).astype(np.float32)
    return image[..., 0] if image.ndim == 3 else image


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="fid.py", description=(
        "Fréchet distance between two image sets in Inception, classifier or pixel features. "
        "Each of A and B is an .npz of images (uint8 0-255 or float in [0, 1]), a folder of PNG "
        "images, or a statistics file written by --save-stats. --kid and --prdc add kernel "
        "distance and precision, recall, density and coverage on the same features."))
    add = parser.add_argument
    add("a", metavar="A", help="first set; with --save-stats: the images")
    add("b", metavar="B", help="second set; with --save-stats: the .npz to write")
    add("--save-stats", action="store_true", help="write the statistics of A to B")
    add("--features", choices=FEATURE_KINDS, default="inception",
        help="Inception pool features (the standard FID), the penultimate layer of a digit "
             "classifier (see --classifier), or raw pixels (default: %(default)s)")
    add("--classifier", metavar="PATH",
        help="with --features classifier: a .keras classifier (default: MNIST's committed one)")
    add("--inception-weights", default="imagenet", metavar="WEIGHTS",
        help='"imagenet" (downloaded by Keras) or a Keras weights file, for machines offline')
    add("--batch-size", type=positive_int, default=50, help="images per Inception forward pass")
    add("--max-samples", type=positive_int, metavar="N", help="the first N images of each set only")
    add("--key", default="images", help="the array of an .npz that holds several")
    add("--kid", action="store_true", help="also print the kernel distance (KID): mean ± std")
    add("--kid-subsets", type=positive_int, default=100, metavar="N",
        help="random subsets the KID averages over (default: %(default)s)")
    add("--kid-subset-size", type=positive_int, metavar="N", help="samples in each KID subset "
        f"(default: {KID_SUBSET_SIZE}, or the smaller set's size)")
    add("--prdc", action="store_true", help="also print B's precision, recall, density, coverage")
    add("--prdc-k", type=positive_int, default=5, metavar="K",
        help="nearest neighbour whose distance is a sample's radius (default: %(default)s)")
    return parser


def command_line_network(args):
    """Inception, or --classifier, by default MNIST's committed one (FIDs like the runs')."""
    if args.features == "inception":
        try:
            return load_inception(args.inception_weights)
        except InceptionUnavailable as error:
            offline = ("; without a network, --inception-weights FILE loads a local copy, and "
                       "--features classifier or --features pixel need no download"
                       if args.inception_weights == "imagenet" else "")
            raise InceptionUnavailable(f"{error}{offline}") from None
    path = args.classifier
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


def check_kid_and_prdc(args, paths, inputs):
    """That --kid and --prdc have what they need, before the slow part."""
    requested = " and ".join(flag for flag, wanted in (("--kid", args.kid), ("--prdc", args.prdc))
                             if wanted)
    if not requested:
        return
    if args.save_stats:
        raise ValueError(f"--save-stats writes one set's statistics: {requested} cannot go with it")
    for path, item in zip(paths, inputs):
        if isinstance(item, Statistics):
            raise ValueError(f"{path} is a statistics file: with {requested}, pass images")
    sizes = [len(item) for item in inputs]
    if args.prdc and args.prdc_k >= min(sizes):
        raise ValueError(f"--prdc-k {args.prdc_k} needs more than {args.prdc_k} images in each "
                         f"set, got {sizes[0]} and {sizes[1]}")
    if args.kid and args.kid_subset_size is None and min(sizes) < KID_SUBSET_SIZE:
        print(f"fid: KID subsets of {min(sizes)} samples, the smaller set's size "
              f"(default {KID_SUBSET_SIZE})", file=sys.stderr)
    if args.kid and (args.kid_subset_size or 0) > min(sizes):
        raise ValueError(f"--kid-subset-size {args.kid_subset_size} is larger than a set: "
                         f"{sizes[0]} and {sizes[1]} images")


def run_command(args) -> None:
    """What main does after parsing; input problems raise ValueError or InceptionUnavailable."""
    paths = [args.a] if args.save_stats else [args.a, args.b]
    inputs = [read_input(path, args.key, args.max_samples) for path in paths]
    for path, item in zip(paths, inputs):  # fail before the slow part, not after it
        if isinstance(item, Statistics) and item.features != args.features:
            raise ValueError(f"{path} holds {item.features} statistics, "
                             f"but --features is {args.features}")
        try:
            if not isinstance(item, Statistics):
                check_images(item, flat_allowed=args.features == "pixel")
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error
    check_kid_and_prdc(args, paths, inputs)
    if args.save_stats and not Path(args.b).parent.is_dir():
        raise ValueError(f"cannot write {args.b}: its folder does not exist")
    network = None
    if args.features != "pixel" and not all(isinstance(item, Statistics) for item in inputs):
        start_tensorflow()
        network = command_line_network(args)
    features = [None if isinstance(item, Statistics)
                else compute_features(item, args.features, network, args.batch_size)
                for item in inputs]
    statistics = [item if matrix is None else statistics_from_features(matrix, args.features)
                  for item, matrix in zip(inputs, features)]
    if args.save_stats:
        save_npz(args.b, **statistics[0]._asdict())
        print(f"saved {args.features} statistics of {statistics[0].n} images to {args.b}")
        return
    distance = round(frechet_distance(*statistics), 4) + 0.0  # + 0.0: no "-0.0000"
    print(f"FID ({args.features}): {distance:.4f}")
    if args.kid:
        mean, std = kernel_distance(*features, args.kid_subsets, args.kid_subset_size)
        print(f"KID ({args.features}): {kid_text(mean, std)}")
    if args.prdc:
        metrics = precision_recall_density_coverage(*features, k=args.prdc_k)
        print("  ".join(f"{name} {value:.3f}" for name, value in metrics.items())
              + f" (k={args.prdc_k})")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        try:
            run_command(args)
        except (ValueError, OSError, InceptionUnavailable) as error:
            raise UsageError(" ".join(str(error).split())) from None
    return exit_code("fid.py", work)


# ---- What vae.py, conv_vae.py and sweep.py share for running ----

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

# Options of vae.py and conv_vae.py that do not define the run they train: how this invocation
# treats the run, and where this machine keeps its files. Every other option of the model, data
# and architecture groups defines it (--epochs aside: it extends a run); sweep.py sets the first
# kind itself and passes the second on as each worker's own.
INVOCATION_OPTIONS = ("resume", "overwrite", "evaluate_only", "model")
MACHINE_OPTIONS = ("data", "inception_weights")


class UsageError(Exception):
    """Bad input, found before any work is lost: one line, exit code 2."""


class RunFailed(Exception):
    """A run that cannot go on (a NaN loss, a full disk); what it saved is intact. Exit code 1."""


def exit_code(prog, work, interrupted="the checkpoints and outputs already written are intact"):
    """Run work() as each script's main: 0, or a failure's one line and exit code (2 bad input, 1 a
    failed run, 130 an interrupt, with its message or `interrupted`)."""
    try:
        work()
    except (UsageError, RunFailed) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, UsageError) else EXIT_FAILED
    except KeyboardInterrupt as error:
        print(f"\ninterrupted: {str(error) or interrupted}")
        return EXIT_INTERRUPTED
    return 0


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors in one `PROG: error: ...` line like every other error, and no abbreviated
    options (argparse would take --epoch for --epochs)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        misspelt = re.match(r"unrecognized arguments: (-[^ =]+)", message)
        options = [option for action in self._actions for option in action.option_strings]
        close = misspelt and difflib.get_close_matches(misspelt[1], options, n=1)
        self.exit(2, f"{self.prog}: error: {message}"
                     + (f" (did you mean {close[0]}?)" if close else "") + "\n")


def argument_type(name, convert, accepted, requirement):
    """An argparse type (named `name` in argparse's messages): convert(text), else "must be
    <requirement>" at parse time, with the usage line, unless accepted(value)."""
    def parse(text):
        value = convert(text)
        if not accepted(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    parse.__name__ = name
    return parse


def whole_number(name, minimum, requirement):
    """An argparse type for whole numbers of at least minimum."""
    return argument_type(name, int, lambda value: value >= minimum, requirement)


positive_int = whole_number("positive_int", 1, "a positive integer")  # counts and sizes
non_negative_int = whole_number("non_negative_int", 0, "0 or more")  # 0 means "none"
# Rates and weights (NaN and inf would not fail until training); fractions such as dropout.
positive_float = argument_type("positive_float", float, lambda value: 0 < value < math.inf,
                               "a positive number")
unit_interval = argument_type("unit_interval", float, lambda value: 0 <= value < 1, "in [0, 1)")
non_negative_float = argument_type("non_negative_float", float, lambda value: 0 <= value < math.inf,
                                   "0 or more")

# What TensorFlow prints on a CPU-only machine before its logging starts (so TF_CPP_MIN_LOG_LEVEL
# cannot silence it): dropped by start_tensorflow, one known message each.
TENSORFLOW_STARTUP_LINES = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"
    r"|[IWE]\d{4} [\d:.]+ +\d+ (port\.cc:\d+\] oneDNN custom operations are on\."
    r"|cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, GPU will not be used\.$"
    r"|cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized to use available CPU "
    r"instructions in performance-critical operations\.$"
    r"|cuda_platform\.cc:\d+\] failed call to cuInit: )"
    r"|To enable the following instructions: .*, in other operations, rebuild TensorFlow with the "
    r"appropriate compiler flags\.$")


@contextlib.contextmanager
def stderr_without(lines):
    """Standard error (at the descriptor, where TensorFlow's C++ writes) held back while the block
    runs, then passed on without the lines that match the pattern `lines`."""
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
            sys.stderr.write("".join(
                line for line in held.read().decode(errors="replace").splitlines(keepends=True)
                if not lines.match(line.rstrip("\n"))))
            sys.stderr.flush()


def start_tensorflow():
    """Import TensorFlow and Keras without TENSORFLOW_STARTUP_LINES (VAE_TENSORFLOW_LOGS=1 shows
    them); every other line, an error included, still shows."""
    if "tensorflow" in sys.modules:
        return
    quiet = os.environ.get("VAE_TENSORFLOW_LOGS") != "1"
    with stderr_without(TENSORFLOW_STARTUP_LINES) if quiet else contextlib.nullcontext():
        import keras  # noqa: F401 (imports TensorFlow)
        import tensorflow as tf
        tf.config.list_physical_devices()  # where the CUDA probe prints


def progress_bar(total, unit_name="image", verbose=True):
    """The one progress display: a keras.utils.Progbar (it shows an ETA) on standard error, so that
    standard output carries only results."""
    import keras

    class StderrProgbar(keras.utils.Progbar):
        def update(self, *args, **kwargs):
            with contextlib.redirect_stdout(sys.stderr):
                super().update(*args, **kwargs)
    # A log file gets one line at the end (verbose=2), as Keras' fit writes there.
    return StderrProgbar(total, verbose=verbose and (1 if sys.stderr.isatty() else 2),
                         unit_name=unit_name)


def atomic_write(path, write):
    """write(temporary path), then a rename onto path: a full disk or Ctrl-C leaves no torn file."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def save_npz(path, **arrays):
    """np.savez through atomic_write (to a file object: savez would append .npz to a name)."""
    def write(temporary):
        with open(temporary, "wb") as file:
            np.savez(file, **arrays)
    atomic_write(path, write)


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


def load_model(path, **load_options):
    """keras.models.load_model, each way a .keras file can fail a UsageError line naming it."""
    import keras
    if not Path(path).is_file():
        raise UsageError(f"{path}: no such model file")
    if not zipfile.is_zipfile(path):
        raise UsageError(f"{path}: unreadable model file (truncated or damaged: not a complete "
                         f".keras archive)")
    try:
        return keras.models.load_model(path, **load_options)
    except Exception as error:
        message = (str(error).strip().splitlines() or [""])[0][:200]
        raise UsageError(f"{path}: cannot load the model ({type(error).__name__}: {message})"
                         ) from error


def in_batches(network, inputs, batch_size=1000, prepare=None):
    """A network's outputs for inputs (an array or a list) as NumPy (a list for several outputs),
    eager batch by batch: predict's values without its tracing; prepare converts each batch."""
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


class Metric(NamedTuple):
    """How to show a metrics.json number: which way is better, decimals printed and in tables."""
    higher_is_better: bool
    digits: int
    table_digits: int
    unit: str
    label: str


# The metrics a run reports, by metrics.json key, in the order of vae.py's summary; sweep.py and
# the results tables read them too (vae.py adds test_<term> per loss term).
RUN_METRICS = {
    "fid_pixel_recon": Metric(False, 3, 2, "", "pixel FID recon"),
    "test_elbo": Metric(True, 3, 2, "nats per image", "test ELBO"),
    "test_log_likelihood_iw": Metric(True, 3, 2, "nats per image", "log p(x)"),
    "active_units": Metric(True, 0, 0, "latent dimensions in use", "active units"),
    "final_train_loss": Metric(False, 3, 2, "per image, as trained", "train loss"),
    "final_test_loss": Metric(False, 3, 2, "per image, as trained", "test loss"),
    "fid_pixel_samples": Metric(False, 3, 2, "", "pixel FID samples"),
    **{f"{name}_{kind}_{images}": metric
       for kind in ("classifier", "inception") for images in ("recon", "samples")
       for name, metric in (
           ("fid", Metric(False, 3, 1, "", f"{kind} FID {images}")),
           ("kid", Metric(False, 5, 2, "", f"{kind} KID {images}")),
           ("precision", Metric(True, 3, 3, "of generated images", f"{kind} precision {images}")),
           ("recall", Metric(True, 3, 3, "of test images", f"{kind} recall {images}")),
           ("density", Metric(True, 3, 3, "", f"{kind} density {images}")),
           ("coverage", Metric(True, 3, 3, "of test images", f"{kind} coverage {images}")))},
    "classifier_test_accuracy": Metric(True, 4, 4, "of test images", "classifier accuracy"),
    "label_accuracy": Metric(True, 4, 3, "of samples of the class asked for", "label accuracy"),
}


if __name__ == "__main__":
    sys.exit(main())
