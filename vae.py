"""Variational autoencoder on MNIST (Kingma & Welling, 2014): the dense model and the run pipeline.

    python vae.py --latent-dim 2 --epochs 30

Reads the whole experiment top to bottom: configuration, data, model, training (with checkpoints
and resume), evaluation (test ELBO, importance-weighted log-likelihood, FIDs) and outputs.
`conv_vae.py` reuses everything here and supplies only its encoder and decoder.
"""

import argparse
import csv
import gzip
import json
import math
import os
import resource
import shutil
import signal
import sys
import time
import zipfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

import fid
import plot_utils

IMAGE_SHAPE = (28, 28, 1)
TEST_BINARIZATION_SEED = 0  # the binarized test set is the same for every run, so results compare
MANIFOLD_SIZE = 30
MANIFOLD_LIMIT = 4.0
EXIT_USAGE = 2
LONG_STEP_SECONDS = 30  # an evaluation step expected to take longer first says so, and how to skip it


class UsageError(Exception):
    """Bad input found before any work is lost: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

IDX_FILES = {
    "x_train": ("train-images-idx3-ubyte", 0x803),
    "y_train": ("train-labels-idx1-ubyte", 0x801),
    "x_test": ("t10k-images-idx3-ubyte", 0x803),
    "y_test": ("t10k-labels-idx1-ubyte", 0x801),
}


def read_idx(path, expected_magic):
    """One IDX file (plain or gzip) as a uint8 array, checking magic number and size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UsageError(f"{path}: cannot read ({e})") from None
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != expected_magic:
        raise UsageError(f"{path}: not an MNIST IDX file (magic number is not {expected_magic:#06x})")
    ndim = expected_magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UsageError(f"{path}: truncated header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != math.prod(shape):
        raise UsageError(f"{path}: header says shape {shape} but holds {len(raw) - header} bytes")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def load_idx_folder(folder):
    arrays = {}
    for key, (name, magic) in IDX_FILES.items():
        candidates = [folder / name, folder / f"{name}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise UsageError(f"{folder}: missing {name} (or {name}.gz)")
        arrays[key] = read_idx(path, magic)
    return arrays


def load_npz(path):
    if not zipfile.is_zipfile(path):
        raise UsageError(f"{path}: not an .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in IDX_FILES if key not in npz.files]
            if missing:
                raise UsageError(f"{path}: missing array(s) {', '.join(missing)} (has {', '.join(npz.files) or 'none'})")
            return {key: npz[key] for key in IDX_FILES}
    except UsageError:
        raise
    except Exception as e:  # zipfile, pickle and value errors all mean "not a usable .npz"
        raise UsageError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None


def check_mnist(arrays, source):
    """Shapes, dtypes, label range and counts, so a wrong file fails now rather than mid-training."""
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or x.shape[0] == 0:
            raise UsageError(f"{source}: x_{split} has shape {x.shape}, expected (N, 28, 28)")
        if x.dtype != np.uint8:
            raise UsageError(f"{source}: x_{split} has dtype {x.dtype}, expected uint8 pixels 0-255")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise UsageError(f"{source}: y_{split} has shape {y.shape}, expected ({x.shape[0]},) to match x_{split}")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() > 9:
            raise UsageError(f"{source}: y_{split} must hold integer labels 0-9")


DATASETS = {  # --dataset: Keras' download, the name in figures, and the ten class names
    "mnist": (keras.datasets.mnist, "MNIST", tuple("0123456789")),
    "fashion_mnist": (keras.datasets.fashion_mnist, "Fashion-MNIST", (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")),
}


def load_mnist(path=None, dataset="mnist"):
    """(x_train, y_train, x_test, y_test) as uint8 arrays, from a .npz, an IDX folder or Keras' download
    of the dataset (MNIST or Fashion-MNIST: the same format)."""
    if path is None:
        module, name, _ = DATASETS[dataset]
        try:
            (x_train, y_train), (x_test, y_test) = module.load_data()
        except Exception as e:
            raise UsageError(f"cannot download {name} ({type(e).__name__}); pass --data PATH to a local copy") from None
        arrays = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
        source = f"keras.datasets.{dataset}"
    else:
        source = Path(path)
        if source.is_dir():
            arrays = load_idx_folder(source)
        elif source.is_file():
            arrays = load_npz(source)
        else:
            raise UsageError(f"{source}: no such file or directory")
    check_mnist(arrays, source)
    return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]


def to_float_images(x):
    """uint8 (N, 28, 28) -> float32 (N, 28, 28, 1) in [0, 1]."""
    return (x.astype(np.float32) / 255.0)[..., None]


def binarize_once(x, seed):
    """Bernoulli(intensity) draw of every pixel: the fixed binarized test set of the benchmark protocol."""
    return (np.random.default_rng(seed).random(x.shape, dtype=np.float32) < x).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="mnist_vae")
class Sampling(layers.Layer):
    """z = mean + exp(log_var / 2) * eps: the reparameterisation trick, seeded."""

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs):
        z_mean, z_log_var = inputs
        epsilon = keras.random.normal(ops.shape(z_mean), seed=self.seed_generator)
        return z_mean + ops.exp(0.5 * z_log_var) * epsilon

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


def kl_divergence(z_mean, z_log_var):
    """KL(q(z|x) || N(0, I)) per image, in closed form."""
    return -0.5 * ops.sum(1.0 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var), axis=-1)


def reconstruction_error(x, x_hat, likelihood):
    """-log p(x|z) per image up to a constant: the original's 784 * MSE, or binary cross-entropy."""
    axes = tuple(range(1, len(x.shape)))
    if likelihood == "gaussian":
        return ops.sum(ops.square(x - x_hat), axis=axes)
    x_hat = ops.clip(x_hat, 1e-7, 1.0 - 1e-7)
    return -ops.sum(x * ops.log(x_hat) + (1.0 - x) * ops.log(1.0 - x_hat), axis=axes)


def log_likelihood_constant(num_pixels, likelihood):
    """What turns the reconstruction error into true nats: squared error is -log N(x; x_hat, 1/2)
    less 0.5 * log(pi) per pixel (392 * log(pi) = 448.8 nats for MNIST); cross-entropy needs nothing."""
    return 0.5 * num_pixels * math.log(math.pi) if likelihood == "gaussian" else 0.0


@keras.saving.register_keras_serializable(package="mnist_vae")
class VAE(keras.Model):
    """Encoder -> Sampling -> decoder, trained on the negative ELBO (reconstruction + KL), or with
    beta / kl_warmup_epochs on reconstruction + weight * KL (see kl_weight)."""

    def __init__(self, encoder, decoder, likelihood="gaussian", binarize="none", seed=None, beta=1.0,
                 kl_warmup_epochs=0, updates_per_epoch=1, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood
        self.binarize = binarize
        self.seed = seed
        self.beta = beta
        self.kl_warmup_epochs = kl_warmup_epochs
        self.updates_per_epoch = updates_per_epoch
        self.sampling = Sampling(seed=seed, dtype="float32")  # see posterior_head
        self.binarize_seed_generator = keras.random.SeedGenerator(None if seed is None else seed + 1)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.reconstruction_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_tracker = keras.metrics.Mean(name="kl_loss")
        self.kl_weight_tracker = keras.metrics.Mean(name="kl_weight")

    @property
    def weighted(self):
        return self.beta != 1 or self.kl_warmup_epochs > 0

    @property
    def metrics(self):
        """The loss terms, and the KL weight when it is not 1 (so history.csv and the curves say so)."""
        return [self.loss_tracker, self.reconstruction_tracker, self.kl_tracker,
                *([self.kl_weight_tracker] if self.weighted else [])]

    def kl_weight(self, updates_done):
        """The KL term's weight in the training objective: beta, reached linearly over the first
        kl_warmup_epochs (epoch e, counted from 0, weighs beta * e / kl_warmup_epochs). A function of
        the optimizer's update count, which checkpoints keep, so a resumed run continues it exactly.
        The test ELBO and the likelihood estimate never use it."""
        if not self.kl_warmup_epochs:
            return self.beta
        epoch = ops.floor(ops.cast(updates_done, "float32") / self.updates_per_epoch)
        return self.beta * ops.minimum(1.0, epoch / self.kl_warmup_epochs)

    def call(self, x, training=False):
        z_mean, z_log_var = self.encoder(x, training=training)
        return self.decoder(self.sampling([z_mean, z_log_var]), training=training)

    def loss_terms(self, x, training, kl_weight=1.0):
        z_mean, z_log_var = self.encoder(x, training=training)
        x_hat = self.decoder(self.sampling([z_mean, z_log_var]), training=training)
        reconstruction = ops.mean(reconstruction_error(x, x_hat, self.likelihood))
        kl = ops.mean(kl_divergence(z_mean, z_log_var))
        return reconstruction + kl_weight * kl, reconstruction, kl

    def track(self, total, reconstruction, kl, kl_weight):
        self.loss_tracker.update_state(total)
        self.reconstruction_tracker.update_state(reconstruction)
        self.kl_tracker.update_state(kl)
        if self.weighted:
            self.kl_weight_tracker.update_state(kl_weight)

    def train_step(self, data):
        """One Adam update per batch. The fast path hands over a group of batches instead (one more
        leading axis) and the loop over them runs inside the step, so that XLA compiles and launches
        one program per group: launching it per batch cost the dense model a third of its time."""
        x = data[0] if isinstance(data, tuple) else data
        if len(x.shape) == len(IMAGE_SHAPE) + 2:
            def update_batch(i, batches_done):
                self.update(x[i])
                return batches_done + 1

            ops.fori_loop(0, ops.shape(x)[0], update_batch, 0)
        else:
            self.update(x)
        return self.get_metrics_result()

    def update(self, x):
        """One batch: forward, gradients, Adam, loss trackers."""
        if self.binarize == "dynamic":
            noise = keras.random.uniform(ops.shape(x), seed=self.binarize_seed_generator)
            x = ops.cast(noise < x, x.dtype)
        kl_weight = self.kl_weight(self.optimizer.iterations)
        with tf.GradientTape() as tape:
            total, reconstruction, kl = self.loss_terms(x, training=True, kl_weight=kl_weight)
            scaled = self.optimizer.scale_loss(total)  # mixed_float16: Keras' loss scaling; otherwise total
        gradients = tape.gradient(scaled, self.trainable_weights)
        self.optimizer.apply(gradients, self.trainable_weights)
        self.track(total, reconstruction, kl, kl_weight)

    def test_step(self, data):
        """The test loss with the weight of the epoch just trained, so train and test curves compare."""
        x = data[0] if isinstance(data, tuple) else data
        kl_weight = self.kl_weight(ops.maximum(self.optimizer.iterations - 1, 0)) if self.kl_warmup_epochs else self.beta
        self.track(*self.loss_terms(x, training=False, kl_weight=kl_weight), kl_weight)
        return self.get_metrics_result()

    def get_config(self):
        return {
            **super().get_config(),
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "decoder": keras.saving.serialize_keras_object(self.decoder),
            "likelihood": self.likelihood,
            "binarize": self.binarize,
            "seed": self.seed,
            "beta": self.beta,
            "kl_warmup_epochs": self.kl_warmup_epochs,
            "updates_per_epoch": self.updates_per_epoch,
        }

    @classmethod
    def from_config(cls, config):
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        config["decoder"] = keras.saving.deserialize_keras_object(config["decoder"])
        return cls(**config)


def posterior_head(h, latent_dim):
    """(mean, log-variance) of q(z|x). These two layers, the sampling and the decoder's last layer
    (its sigmoid pixels) compute in float32 under any --dtype-policy: in bfloat16 (8 bits of
    mantissa) a mean near 3 moves in steps of 0.016, as large as the posterior's spread, and a
    pixel of 0.998 rounds to 1 (binary cross-entropy to its clip). They cost little in float32
    (the convolutional decoder keeps only its sigmoid there, after a 1-channel bfloat16 convolution)."""
    z_mean = layers.Dense(latent_dim, name="z_mean", dtype="float32")(h)
    z_log_var = layers.Dense(latent_dim, name="z_log_var", dtype="float32")(h)
    return z_mean, z_log_var


def dense_layers(h, units, count, activation):
    """count Dense(units, activation) layers on h: the hidden stacks of both scripts' networks."""
    for _ in range(count):
        h = layers.Dense(units, activation=activation)(h)
    return h


def dense_encoder(args):
    """784 -> Dense(hidden, relu) -> (mean, log-variance), as in the original; --hidden-layers
    stacks more hidden layers of the same width."""
    x = keras.Input(IMAGE_SHAPE)
    h = dense_layers(layers.Flatten()(x), args.hidden_dim, args.hidden_layers, args.activation)
    return keras.Model(x, posterior_head(h, args.latent_dim), name="encoder")


def dense_decoder(args):
    """latent -> Dense(hidden, relu) -> Dense(784, sigmoid), as in the original (mirrors the encoder)."""
    z = keras.Input((args.latent_dim,))
    h = dense_layers(z, args.hidden_dim, args.hidden_layers, args.activation)
    x_hat = layers.Dense(math.prod(IMAGE_SHAPE), activation="sigmoid", dtype="float32")(h)  # see posterior_head
    return keras.Model(z, layers.Reshape(IMAGE_SHAPE, dtype="float32")(x_hat), name="decoder")


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

def encode(model, x, batch_size=1000):
    """Posterior means and log-variances of all images."""
    z_mean, z_log_var = model.encoder.predict(x, batch_size=batch_size, verbose=0)
    return z_mean, z_log_var


def decode(model, z, batch_size=1000):
    return model.decoder.predict(z, batch_size=batch_size, verbose=0)


def evaluate_elbo(model, x, seed, posterior=None):
    """One z ~ q(z|x) per test image with fixed noise (deterministic, unlike a fit-time metric).

    Returns the reconstructions (as the original's `vae.predict`) and the per-image ELBO terms in nats.
    posterior: (z_mean, z_log_var) of x, when the caller has already encoded it.
    """
    z_mean, z_log_var = posterior or encode(model, x)
    epsilon = np.random.default_rng(seed).standard_normal(z_mean.shape).astype(np.float32)
    reconstructions = decode(model, z_mean + np.exp(0.5 * z_log_var) * epsilon)
    error = ops.convert_to_numpy(reconstruction_error(x, reconstructions, model.likelihood))
    nll = error + log_likelihood_constant(math.prod(x.shape[1:]), model.likelihood)
    kl = ops.convert_to_numpy(kl_divergence(z_mean, z_log_var))
    return reconstructions, nll, kl


def interpolate(model, x, labels, z_mean, class_names=DATASETS["mnist"][2], steps=10):
    """Straight latent paths between the posterior means of test images of different classes (the
    first image of each class to the first of the class 3 after it), decoded at `steps` points.
    Returns (start images, decodings (pairs, steps, ...), end images, row labels)."""
    firsts = {label: np.flatnonzero(labels == label)[0] for label in np.unique(labels)}
    pairs = [(firsts[label], firsts[(label + 3) % 10]) for label in sorted(firsts) if (label + 3) % 10 in firsts]
    starts, ends = np.array([a for a, _ in pairs], int), np.array([b for _, b in pairs], int)
    t = np.linspace(0, 1, steps, dtype=np.float32)[None, :, None]
    paths = (1 - t) * z_mean[starts][:, None] + t * z_mean[ends][:, None]
    decoded = decode(model, paths.reshape(-1, z_mean.shape[1])).reshape(len(pairs), steps, *x.shape[1:])
    names = [f"{class_names[labels[a]]} \N{RIGHTWARDS ARROW} {class_names[labels[b]]}" for a, b in pairs]
    return x[starts], decoded, x[ends], names


def standard_normal_log_density(x):
    return -0.5 * (math.log(2 * math.pi) + ops.square(x))


IW_DECODER_MEMORY = 512 * 2**20  # bytes of decoder activations per call of the likelihood estimate


def decoded_image_bytes(decoder):
    """float32 bytes of every layer output of the decoder, and the repeated input, for one image:
    an upper bound on what one decoded sample holds in memory."""
    return 4 * sum(math.prod(layer.output.shape[1:]) for layer in decoder.layers[1:]) + 4 * math.prod(IMAGE_SHAPE)


def importance_weighted_log_likelihood(model, x, num_samples, seed, images_per_batch=100,
                                       samples_per_chunk=None, xla=True, verbose=True, posterior=None,
                                       decoder_memory=IW_DECODER_MEMORY):
    """log p(x) ~ log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x) (Burda et al. 2016), per image.

    Images go through in batches and their K samples in chunks, so memory stays bounded; the
    log-weights of one batch are combined with log-sum-exp, which is stable for any magnitude.
    A chunk whose decoded samples would hold more than decoder_memory bytes is decoded a few images
    at a time (the convolutional decoder's activations are 30x the dense one's); the noise is drawn
    per chunk either way, so the estimate does not depend on the memory limit.
    """
    num_pixels = math.prod(x.shape[1:])
    constant = log_likelihood_constant(num_pixels, model.likelihood)
    samples_per_chunk = samples_per_chunk or max(1, min(num_samples, 20000 // images_per_batch))
    decodes_per_call = max(1, decoder_memory // decoded_image_bytes(model.decoder))

    @tf.function(jit_compile=xla)
    def log_weights(x_batch, z_mean, z_log_var, epsilon):
        z = z_mean[:, None, :] + ops.exp(0.5 * z_log_var)[:, None, :] * epsilon
        log_q = ops.sum(standard_normal_log_density(epsilon) - 0.5 * z_log_var[:, None, :], axis=-1)
        log_prior = ops.sum(standard_normal_log_density(z), axis=-1)
        batch, chunk, latent = ops.shape(epsilon)
        x_hat = model.decoder(ops.reshape(z, (batch * chunk, latent)), training=False)
        x_repeated = ops.repeat(x_batch, chunk, axis=0)
        log_px = -(reconstruction_error(x_repeated, x_hat, model.likelihood) + constant)
        return ops.reshape(log_px, (batch, chunk)) + log_prior - log_q

    rng = np.random.default_rng(seed)
    z_mean, z_log_var = posterior or encode(model, x)
    estimates = np.empty(len(x))
    start = time.perf_counter()
    for begin in range(0, len(x), images_per_batch):
        end = min(begin + images_per_batch, len(x))
        chunks = []
        for done in range(0, num_samples, samples_per_chunk):
            size = min(samples_per_chunk, num_samples - done)
            epsilon = rng.standard_normal((end - begin, size, z_mean.shape[1])).astype(np.float32)
            step = max(1, decodes_per_call // size)
            pieces = [slice(i, min(i + step, end)) for i in range(begin, end, step)]
            chunks.append(ops.concatenate([
                log_weights(x[part], z_mean[part], z_log_var[part], epsilon[part.start - begin:part.stop - begin])
                for part in pieces], axis=0))
        all_weights = ops.concatenate(chunks, axis=1)
        estimates[begin:end] = ops.convert_to_numpy(ops.logsumexp(all_weights, axis=1)) - math.log(num_samples)
        if verbose:
            elapsed = time.perf_counter() - start
            if begin == 0:
                first_batch = elapsed  # holds the compilation: left out of the rate
                if end < len(x):
                    continue
            rate = (elapsed - first_batch) / (end - images_per_batch) if begin else elapsed / end
            remaining = rate * (len(x) - end)
            if begin == images_per_batch and elapsed + remaining > LONG_STEP_SECONDS:
                print(f"importance-weighted log-likelihood (K={num_samples}) of {len(x)} images: about "
                      f"{fid.format_duration(elapsed + remaining)} (--iw-samples 0 skips it)")
            print(f"\rimportance-weighted log-likelihood (K={num_samples}): {end}/{len(x)} images, "
                  f"{elapsed:.0f} s elapsed, ~{remaining:.0f} s left", end="", flush=True)
    if verbose:
        print()
    return estimates


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

# What defines a run: a resumed run must agree on these (the rest may change between calls).
RUN_DEFINING = ("latent_dim", "batch_size", "learning_rate", "seed", "likelihood", "binarize",
                "train_size", "test_size", "dtype_policy", "beta", "kl_warmup_epochs", "dataset", "lr_schedule",
                "activation")


DTYPE_POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
ACTIVATIONS = ("relu", "elu", "gelu", "silu", "tanh")


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def unit_interval(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def fid_kinds(text):
    """--fid: none, all, or a comma-separated subset of fid.FEATURE_KINDS, in their canonical order."""
    if text in ("none", "all"):
        return () if text == "none" else fid.FEATURE_KINDS
    kinds = [kind.strip() for kind in text.split(",")]
    unknown = [kind for kind in kinds if kind not in fid.FEATURE_KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown FID {unknown[0]!r}: give none, all, or a comma-separated "
                                         f"subset of {','.join(fid.FEATURE_KINDS)}")
    return tuple(kind for kind in fid.FEATURE_KINDS if kind in kinds)


def build_parser(description, epochs, batch_size, results_dir, iw_samples):
    parser = fid.OneLineErrorParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train = parser.add_argument_group("model and training")
    train.add_argument("--latent-dim", type=fid.positive_int, default=2, help="size of z")
    train.add_argument("--epochs", type=fid.positive_int, default=epochs, help="total epochs to train to")
    train.add_argument("--batch-size", type=fid.positive_int, default=batch_size, help="images per step")
    train.add_argument("--learning-rate", type=positive_float, default=1e-3, help="Adam learning rate")
    train.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                       help="cosine: decay the learning rate to 0 along a half cosine over the --epochs of the run "
                            "(Loshchilov & Hutter, 2017); it ends with the run, so --resume cannot extend it")
    train.add_argument("--seed", type=int, default=0, help="seed for weights, shuffling, sampling and evaluation")
    train.add_argument("--likelihood", choices=("gaussian", "bernoulli"), default="gaussian",
                       help="decoder p(x|z): gaussian is the original 784*MSE loss, bernoulli is binary cross-entropy")
    train.add_argument("--binarize", choices=("none", "dynamic"), default="none",
                       help="dynamic: resample binary pixels ~ Bernoulli(intensity) at each use (test set: once, fixed)")
    train.add_argument("--beta", type=positive_float, default=1.0,
                       help="weight of the KL term in the training loss (beta-VAE); 1 is the ELBO. The test ELBO and "
                            "likelihood estimate always weigh it 1")
    train.add_argument("--kl-warmup-epochs", type=non_negative_int, default=0,
                       help="raise the KL weight linearly from 0 to --beta over the first N epochs (KL annealing)")
    train.add_argument("--dtype-policy", choices=DTYPE_POLICIES, default="float32",
                       help="Keras dtype policy: mixed_* computes the VAE's layers in 16 bits, in training and in "
                            "the likelihood estimate; its variables, the loss, the ELBO and the FID networks stay "
                            "float32. mixed_bfloat16 pays for conv_vae.py on CPUs with AMX (see the README)")
    train.add_argument("--plain", action="store_true",
                       help="plain Keras path (arrays into fit, one batch per step, no XLA, Keras' own dropout): "
                            "same math, slower; the speed baseline")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=tuple(DATASETS), default="mnist",
                      help="Keras' download when --data is not given; with --data, which labels its files hold "
                           "(class names in the figures)")
    data.add_argument("--data", default=None,
                      help="an .npz (x_train, y_train, x_test, y_test) or a folder of the four MNIST IDX files; "
                           "default: Keras' download of --dataset")
    data.add_argument("--train-size", type=fid.positive_int, default=None, help="train on the first N images (quick runs)")
    data.add_argument("--test-size", type=fid.positive_int, default=None, help="evaluate on the first N test images")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--fid", type=fid_kinds, default="pixel,classifier",
                            help="FIDs to report: none, all, or a comma-separated subset of pixel (the original's "
                                 "metric), classifier (features of a digit classifier trained on --data, once, "
                                 "cached) and inception (the standard FID; about 10 min per 10,000 images on a CPU)")
    evaluation.add_argument("--fid-samples", type=fid.positive_int, default=10000,
                            help="prior samples compared with the test images")
    evaluation.add_argument("--inception-weights", default="imagenet",
                            help="'imagenet' (Keras download) or a path to InceptionV3 weights for offline machines")
    evaluation.add_argument("--fid-batch-size", type=fid.positive_int, default=50, help="images per Inception batch")
    evaluation.add_argument("--iw-samples", type=non_negative_int, default=iw_samples,
                            help="K of the importance-weighted log-likelihood estimate; 0 skips it")
    runs = parser.add_argument_group("outputs and long runs")
    runs.add_argument("--results-dir", default=results_dir, help="where every output and checkpoint goes")
    runs.add_argument("--tensorboard", action="store_true",
                      help="log loss terms and progress frames to <results-dir>/tensorboard/ (tensorboard --logdir results)")
    runs.add_argument("--resume", action="store_true", help="continue the run in --results-dir to --epochs")
    runs.add_argument("--overwrite", action="store_true", help="replace a run already in --results-dir")
    runs.add_argument("--evaluate-only", action="store_true",
                      help="rebuild figures and metrics from the saved model, without training")
    runs.add_argument("--model", default=None, help="with --evaluate-only: a .keras file instead of <results-dir>/model.keras")
    return parser


# ----------------------------------------------------------------------------------------------
# Outputs: every file is written to a temporary name and renamed (fid.atomic_write), so none is
# ever half-written
# ----------------------------------------------------------------------------------------------

def write_json(path, data):
    fid.atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))


def write_history_csv(path, history, seconds_per_epoch):
    def write(temporary):
        with open(temporary, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["epoch", *history, "seconds"])
            for epoch, row in enumerate(zip(*history.values(), seconds_per_epoch), start=1):
                writer.writerow([epoch, *(f"{value:.6g}" for value in row)])
    fid.atomic_write(path, write)


def save_figure(figure, path):
    fid.atomic_write(path, lambda p: figure.savefig(p, format="png"))


def save_model(model, path):
    fid.atomic_write(path, model.save)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

CHECKPOINT_STATE = "checkpoint.json"
PROGRESS_FRAMES = "progress_frames.npy"


LOSS_CURVES_SHARE = 0.02  # redraw loss_curves.png when it costs under 2% of the training time since the last drawing


class TrainingState(keras.callbacks.Callback):
    """Keeps the history across resumes, checkpoints every good epoch and stops on a NaN loss.

    The model of epoch N goes to checkpoint-epochN.keras first, then checkpoint.json (the commit
    point) names it, then the older model file is removed: a kill at any moment leaves a consistent
    checkpoint behind.

    Training you can watch: history.csv follows every epoch; loss_curves.png is redrawn whenever
    drawing it (about 0.4 s) costs under LOSS_CURVES_SHARE of the time trained since it was last
    drawn: every epoch of the convolutional model, every 10-15 of the dense one; a progress frame
    (watch_images reconstructed, watch_z decoded) joins progress_frames.npy before each checkpoint
    (a kill may leave one frame too many, which a resume drops); with a tensorboard_dir the frame
    also goes to TensorBoard.
    """

    def __init__(self, results_dir, config, title, watch_images, watch_z, history=None, seconds_per_epoch=None,
                 tensorboard_dir=None):
        super().__init__()
        self.results_dir = results_dir
        self.config = config
        self.title = title
        self.watch_images, self.watch_z = watch_images, watch_z
        self.history = history or {}
        self.seconds_per_epoch = seconds_per_epoch or []
        self.diverged_epoch = None
        self.loss_curves_drawn, self.loss_curves_seconds = -math.inf, 0.0
        self.frames = list(read_frames(results_dir)[:self.epochs_done])
        self.image_writer = tf.summary.create_file_writer(str(tensorboard_dir / "progress")) if tensorboard_dir else None

    @property
    def epochs_done(self):
        return len(self.seconds_per_epoch)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if logs and not math.isfinite(float(logs["loss"])):
            self.diverged_epoch = self.epochs_done + 1
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.diverged_epoch or not all(math.isfinite(float(v)) for v in logs.values()):
            self.diverged_epoch = self.diverged_epoch or self.epochs_done + 1
            self.model.stop_training = True
            return
        self.seconds_per_epoch.append(time.perf_counter() - self.epoch_start)
        for name, value in logs.items():
            self.history.setdefault(name, []).append(float(value))
        self.frames.append(self.progress_frame())
        fid.atomic_write(self.results_dir / PROGRESS_FRAMES, lambda p: np.save(p, np.stack(self.frames)))
        previous = read_checkpoint(self.results_dir)
        model_file = f"checkpoint-epoch{self.epochs_done}.keras"
        save_model(self.model, self.results_dir / model_file)
        write_json(self.results_dir / CHECKPOINT_STATE, {
            "epochs_done": self.epochs_done, "model_file": model_file, "config": self.config,
            "history": self.history, "seconds_per_epoch": self.seconds_per_epoch,
            "random_states": [variable.numpy().tolist() for variable in random_states(self.model)]})
        if previous and previous["model_file"] != model_file:
            (self.results_dir / previous["model_file"]).unlink(missing_ok=True)
        write_history_csv(self.results_dir / "history.csv", self.history, self.seconds_per_epoch)
        if self.loss_curves_seconds <= LOSS_CURVES_SHARE * (time.perf_counter() - self.loss_curves_drawn):
            start = time.perf_counter()
            save_figure(plot_utils.loss_curves(self.history, title=self.title), self.results_dir / "loss_curves.png")
            self.loss_curves_drawn = time.perf_counter()
            self.loss_curves_seconds = self.loss_curves_drawn - start
        if self.image_writer:
            with self.image_writer.as_default():
                tf.summary.image("progress", self.frames[-1][None, :, :, None], step=epoch)
            self.image_writer.flush()

    def progress_frame(self):
        """Eager calls on a few images: a few milliseconds, under 2% of the shortest epoch."""
        z_mean, _ = self.model.encoder(self.watch_images, training=False)
        decoded = ops.convert_to_numpy(self.model.decoder(ops.concatenate([z_mean, self.watch_z]), training=False))
        count = len(self.watch_images)
        return plot_utils.progress_frame(self.watch_images, decoded[:count], decoded[count:])


def random_states(model):
    """The state of each random generator in the model (sampling, dropout, binarization). A .keras
    file leaves them out, so the checkpoint keeps them: a resumed run goes on with fresh noise
    instead of replaying the first epoch's."""
    return [variable for variable in model.variables if variable.name == "seed_generator_state"]


def read_frames(results_dir):
    path = results_dir / PROGRESS_FRAMES
    return np.load(path) if path.is_file() else np.zeros((0, 0, 0), np.uint8)


def read_checkpoint(results_dir):
    path = results_dir / CHECKPOINT_STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        if not (results_dir / state["model_file"]).is_file():
            raise ValueError(f"{state['model_file']} is missing")
        return state
    except (ValueError, KeyError) as e:
        raise UsageError(f"{path}: unusable checkpoint ({e}); use --overwrite to start again") from None


def load_saved_model(path):
    try:
        return keras.models.load_model(path)
    except Exception as e:
        raise UsageError(f"{path}: cannot load the model ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def check_results_dir(args, parser, run_defining):
    """Refuse to clobber a run (its model or checkpoint: what cannot be recovered), and prove the
    directory is writable, before anything is trained. Figures and metrics without a model, such as
    the examples committed in results/, are replaced."""
    results_dir = Path(args.results_dir)
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        probe = results_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"{results_dir}: not writable ({e.strerror})") from None
    if args.overwrite:
        for old in [results_dir / "metrics.json", results_dir / CHECKPOINT_STATE, results_dir / PROGRESS_FRAMES,
                    *results_dir.glob("checkpoint-epoch*.keras")]:
            old.unlink(missing_ok=True)
        shutil.rmtree(results_dir / "tensorboard", ignore_errors=True)  # its steps would repeat the new run's
        return results_dir, None
    state = read_checkpoint(results_dir)
    finished = (results_dir / "model.keras").is_file()
    if args.evaluate_only:
        model_path = Path(args.model) if args.model else results_dir / "model.keras"
        if not model_path.is_file():
            raise UsageError(f"{model_path}: no saved model to evaluate (train first, or pass --model PATH)")
        return results_dir, state
    if args.resume:
        if state is None:
            raise UsageError(f"{results_dir}: no checkpoint to resume from")
        for key, saved in state["config"].items():
            if key in run_defining:
                given = getattr(args, key)
                if given != saved and given != parser.get_default(key):
                    raise UsageError(f"--{key.replace('_', '-')} {given} differs from the checkpointed run's {saved}")
        if state["config"].get("lr_schedule") == "cosine" and args.epochs != state["config"]["epochs"]:
            raise UsageError(f"--epochs {args.epochs}: the run's cosine learning-rate schedule ends at epoch "
                             f"{state['config']['epochs']}; resume with --epochs {state['config']['epochs']}")
        if state["epochs_done"] >= args.epochs and (results_dir / "metrics.json").is_file():
            raise UsageError(f"{results_dir}: already trained {state['epochs_done']} epochs and evaluated; "
                             "pass a larger --epochs, or use --evaluate-only")
        return results_dir, state
    if finished or state:
        what = "a finished run" if finished else f"an interrupted run ({state['epochs_done']} epochs)"
        raise UsageError(f"{results_dir} holds {what}: use --resume to continue it, "
                         "--evaluate-only to re-evaluate it, or --overwrite to replace it")
    if (results_dir / "metrics.json").is_file():  # e.g. the example results committed with the repository
        print(f"note: {results_dir} holds results without a model or checkpoint; this run replaces them "
              "(git checkout restores the repository's examples)")
    return results_dir, None


def prepare_inception(args):
    """Load Inception before training: a bad weights file is an input error; no download is a warning."""
    if "inception" not in args.fid:
        return None, None
    try:
        return fid.load_inception(args.inception_weights), None
    except fid.InceptionUnavailable as e:
        if args.inception_weights != "imagenet":
            raise UsageError(f"--inception-weights: {e}") from None
        print(f"warning: Inception weights unavailable ({e}); Inception FIDs will be null. "
              "Pass --inception-weights PATH on an offline machine.")
        return None, str(e)


def make_datasets(args, x_train, x_test, first_epoch=0):
    """The fast path's data: a fresh seeded permutation each epoch, gathered into groups of
    args.batches_per_step batches (see VAE.train_step), prefetched while the previous group trains,
    across epoch ends too (one endless stream; fit takes groups_per_epoch from it each epoch). The
    groups hold exactly one epoch's batches, the smaller last one included, so the updates are the same.
    A resumed run starts at its first_epoch's permutation, so it sees what an unbroken run would.

    Returns (train, test, groups_per_epoch).
    """
    num_train, batch_size = len(x_train), args.batch_size
    num_full, remainder = divmod(num_train, batch_size)
    images = tf.constant(x_train)

    def permutation(random_seed):
        return tf.random.experimental.stateless_shuffle(tf.range(num_train, dtype=tf.int64),
                                                        seed=tf.stack([random_seed, 0]))

    def groups(order):
        full_batches = tf.reshape(order[:num_full * batch_size], (num_full, batch_size))
        index_groups = tf.data.Dataset.from_tensor_slices(full_batches).batch(args.batches_per_step)
        if remainder:
            index_groups = index_groups.concatenate(tf.data.Dataset.from_tensors(order[None, num_full * batch_size:]))
        return index_groups.map(lambda indices: tf.gather(images, indices))

    permutations = tf.data.Dataset.random(seed=args.seed).skip(first_epoch).map(permutation)
    train = permutations.flat_map(groups).prefetch(tf.data.AUTOTUNE)
    test = tf.data.Dataset.from_tensor_slices(x_test).batch(max(batch_size, 1000)).prefetch(tf.data.AUTOTUNE)
    return train, test, math.ceil(num_full / args.batches_per_step) + (remainder > 0)


def compile_model(model, args):
    learning_rate = args.learning_rate
    if args.lr_schedule == "cosine":  # a function of the optimizer's update count: checkpoints keep both
        learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, args.epochs * model.updates_per_epoch)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), jit_compile=args.xla and not args.plain)


def train(model, args, title, results_dir, x_train, x_test, state):
    """model.fit from the checkpointed epoch; returns the TrainingState callback (history, timings).
    The progress frames show the first 10 test images and 20 prior samples, the same every epoch."""
    watch_z = np.random.default_rng(args.seed + 2).standard_normal((20, args.latent_dim)).astype(np.float32)
    tensorboard_dir = results_dir / "tensorboard" if args.tensorboard else None
    tracker = TrainingState(results_dir, config=run_config(args), title=title, watch_images=x_test[:10], watch_z=watch_z,
                            history=state and state["history"], seconds_per_epoch=state and state["seconds_per_epoch"],
                            tensorboard_dir=tensorboard_dir)
    callbacks = [tracker]
    if tensorboard_dir:  # after the tracker: an epoch is logged once its checkpoint is committed, so a resume
        # that repeats an uncommitted epoch never logs a step twice
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(tensorboard_dir), write_graph=False))
    initial_epoch = tracker.epochs_done
    (results_dir / "metrics.json").unlink(missing_ok=True)  # it describes a model this run replaces; its
    # absence also tells --resume that an evaluation did not finish
    if args.plain:
        fit_data = dict(x=x_train, batch_size=args.batch_size, validation_data=(x_test,), shuffle=True)
    else:
        train_data, test_data, groups_per_epoch = make_datasets(args, x_train, x_test, initial_epoch)
        fit_data = dict(x=train_data, steps_per_epoch=groups_per_epoch, validation_data=test_data,
                        shuffle=False)  # the dataset shuffles
    resume_command = (f"python {sys.argv[0]} --results-dir {results_dir} --resume --epochs {args.epochs}"
                      + ("" if args.data is None else f" --data {args.data}"))
    model.steps_per_execution = 1  # a group of batches per call; checkpoints of older revisions saved 67
    try:
        model.fit(**fit_data, epochs=args.epochs, initial_epoch=initial_epoch, callbacks=callbacks,
                  verbose=2 if os.environ.get("CI") else 1)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {tracker.epochs_done} complete epoch(s) are checkpointed in {results_dir}.")
        print(f"resume with: {resume_command}")
        raise SystemExit(130)
    except OSError as e:  # e.g. the disk filled up while writing a checkpoint
        print(f"error: cannot write a checkpoint in {results_dir} ({e.strerror or e}); the last complete one "
              f"({tracker.epochs_done} epochs) is intact. Free space, then: {resume_command}", file=sys.stderr)
        raise SystemExit(1)
    if tracker.diverged_epoch:
        kept = (f"the last good checkpoint ({tracker.epochs_done} epochs) is kept in {results_dir}"
                if tracker.epochs_done else "no epoch completed, so there is no checkpoint")
        print(f"error: the loss became NaN or infinite in epoch {tracker.diverged_epoch}; training stopped and "
              f"{kept}. Try a smaller --learning-rate.", file=sys.stderr)
        raise SystemExit(1)
    return tracker


def run_config(args):
    return {key: value for key, value in vars(args).items()
            if key not in ("resume", "overwrite", "evaluate_only", "model")}


def evaluate(model, args, title, results_dir, x_test, y_test, mnist, inception, inception_error):
    """Figures, ELBO, importance-weighted log-likelihood and FIDs; deterministic for a given seed."""
    start = time.perf_counter()
    metrics = {}
    test_images = binarize_once(x_test, TEST_BINARIZATION_SEED) if args.binarize == "dynamic" else x_test
    posterior = encode(model, test_images)
    reconstructions, nll, kl = evaluate_elbo(model, test_images, args.seed, posterior)
    metrics.update(test_elbo=float(-np.mean(nll + kl)), test_reconstruction_nll=float(np.mean(nll)),
                   test_kl=float(np.mean(kl)))
    save_figure(plot_utils.reconstructions(test_images[:100], reconstructions[:100], title=title),
                results_dir / "reconstruction_images.png")

    z_mean = posterior[0]
    class_names = DATASETS[args.dataset][2]
    save_figure(plot_utils.latent_space(z_mean, y_test, title=title, class_names=None if args.dataset == "mnist" else class_names),
                results_dir / "latent_space_representation.png")
    starts, paths, ends, pair_labels = interpolate(model, test_images, y_test, z_mean, class_names)
    if pair_labels:
        save_figure(plot_utils.interpolation(starts, paths, ends, pair_labels, title=title),
                    results_dir / "interpolation.png")
    if z_mean.shape[1] == 2:
        grid = np.linspace(-MANIFOLD_LIMIT, MANIFOLD_LIMIT, MANIFOLD_SIZE, dtype=np.float32)
        z_grid = np.stack(np.meshgrid(grid, grid[::-1]), axis=-1).reshape(-1, 2)  # row 0 = largest z[1]
        cells = decode(model, z_grid).reshape(MANIFOLD_SIZE, MANIFOLD_SIZE, 28, 28)
        save_figure(plot_utils.manifold(cells, grid, title=title), results_dir / "mnist_manifold.png")
    else:
        print(f"note: latent dimension {z_mean.shape[1]}: the 2-D manifold figure is skipped")

    prior_rng = np.random.default_rng(args.seed + 1)
    count = args.fid_samples if args.fid else 100  # the figure shows the first 100 either way
    samples = decode(model, prior_rng.standard_normal((count, z_mean.shape[1])).astype(np.float32))
    save_figure(plot_utils.samples(samples[:100], title=title), results_dir / "samples.png")

    if args.iw_samples:
        iw_start = time.perf_counter()
        log_likelihood = importance_weighted_log_likelihood(model, test_images, args.iw_samples, args.seed, xla=args.xla,
                                                            posterior=posterior)
        metrics.update(test_log_likelihood_iw=float(np.mean(log_likelihood)), iw_samples=args.iw_samples,
                       iw_seconds=round(time.perf_counter() - iw_start, 2))
    metrics.update(fids(args, test_images, reconstructions, samples, mnist, inception, inception_error))
    metrics["evaluation_seconds"] = round(time.perf_counter() - start, 2)
    return metrics


def fids(args, test_images, reconstructions, samples, mnist, inception, inception_error):
    """Each FID of args.fid, of the reconstructions and of the prior samples against the test images.

    The classifier is trained on the whole training split of the data (mnist: the four uint8
    arrays), whatever --train-size, so every run on the same data shares one classifier.
    """
    results, networks, seconds = {}, {"pixel": None} if "pixel" in args.fid else {}, {}
    start = time.perf_counter()
    if "classifier" in args.fid:
        networks["classifier"] = fid.load_or_train_classifier(*mnist, skip_hint="; leave classifier out of --fid to skip it")
        results["classifier_test_accuracy"] = networks["classifier"].test_accuracy
        seconds["classifier_setup"] = time.perf_counter() - start
    if "inception" in args.fid:
        if inception is None:
            results.update(fid_inception_recon=None, fid_inception_samples=None, fid_inception_error=inception_error)
        else:
            networks["inception"] = inception
    for kind, network in networks.items():
        start = time.perf_counter()
        verbose, skip_hint = kind == "inception", "; leave inception out of --fid to skip it"
        real = fid.compute_statistics(test_images, kind, network, args.fid_batch_size, verbose=verbose,
                                      cache_dir=None if kind == "pixel" else fid.default_cache_dir(), skip_hint=skip_hint)
        for name, images in (("recon", reconstructions), ("samples", samples)):
            if verbose:
                print(f"Inception FID, test images vs {name}:")
            statistics = fid.compute_statistics(images, kind, network, args.fid_batch_size, verbose=verbose,
                                                skip_hint=skip_hint)
            results[f"fid_{kind}_{name}"] = fid.frechet_distance(real, statistics)
        seconds[kind] = time.perf_counter() - start
    return {**results, "fid_seconds": {step: round(value, 2) for step, value in seconds.items()}}


def library_versions():
    import matplotlib
    import scipy

    return {"python": sys.version.split()[0], "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__, "matplotlib": matplotlib.__version__}


def print_summary(title, metrics, results_dir):
    print(f"\n{title}: {metrics['epochs']} epochs, results in {results_dir}/")
    shown = ["final_train_loss", "final_test_loss", "test_elbo", "test_log_likelihood_iw",
             "fid_pixel_recon", "fid_pixel_samples", "fid_classifier_recon", "fid_classifier_samples",
             "classifier_test_accuracy", "fid_inception_recon", "fid_inception_samples"]
    for key in shown:
        if key in metrics:
            value = metrics[key]
            print(f"  {key:26s} {'null' if value is None else f'{value:.3f}'}")
    if metrics.get("seconds_per_epoch"):
        print(f"  {'median seconds per epoch':26s} {np.median(metrics['seconds_per_epoch']):.2f}")


def build_model(args, build_encoder, build_decoder, updates_per_epoch=1):
    """A new VAE whose layers compute in args.dtype_policy. The policy is Keras' global setting while
    the layers are made (each keeps its own, and model.keras saves it), then back to float32 so
    that nothing built later, such as the FID classifier, inherits it."""
    keras.config.set_dtype_policy(args.dtype_policy)
    try:
        return VAE(build_encoder(args), build_decoder(args), likelihood=args.likelihood, binarize=args.binarize,
                   seed=args.seed, beta=args.beta, kl_warmup_epochs=args.kl_warmup_epochs,
                   updates_per_epoch=updates_per_epoch)
    finally:
        keras.config.set_dtype_policy("float32")


def run(args, parser, build_encoder, build_decoder, title, run_defining):
    results_dir, state = check_results_dir(args, parser, run_defining)
    if state and (args.resume or args.evaluate_only):
        for key in run_defining:  # an option added since the checkpoint was written has its default there
            setattr(args, key, state["config"].get(key, parser.get_default(key)))
    mnist = load_mnist(args.data, args.dataset)
    figure_title = title if args.dataset == "mnist" else f"{title} on {DATASETS[args.dataset][1]}"
    x_train, _, x_test, y_test = mnist
    x_train = to_float_images(x_train[:args.train_size])
    x_test, y_test = to_float_images(x_test[:args.test_size]), y_test[:args.test_size]
    inception, inception_error = prepare_inception(args)

    if args.evaluate_only:
        model = load_saved_model(Path(args.model) if args.model else results_dir / "model.keras")
        args.likelihood, args.binarize, args.dtype_policy = model.likelihood, model.binarize, model.dtype_policy.name
        history = state["history"] if state else None
        seconds_per_epoch = state["seconds_per_epoch"] if state else []
    else:
        keras.utils.set_random_seed(args.seed)
        if state:
            model = load_saved_model(results_dir / state["model_file"])
            for variable, value in zip(random_states(model), state.get("random_states", [])):
                variable.assign(value)
            print(f"resuming from epoch {state['epochs_done']} of {args.epochs}" if state["epochs_done"] < args.epochs else
                  f"training finished ({state['epochs_done']} epochs) but its evaluation did not: completing it")
        else:
            model = build_model(args, build_encoder, build_decoder, math.ceil(len(x_train) / args.batch_size))
            model(x_train[:1])  # builds the weights, so checkpoints hold them from epoch 1
            compile_model(model, args)
        tracker = train(model, args, figure_title, results_dir, x_train, x_test, state)
        history, seconds_per_epoch = tracker.history, tracker.seconds_per_epoch
        save_model(model, results_dir / "model.keras")
        images = plot_utils.progress_animation(read_frames(results_dir))
        fid.atomic_write(results_dir / "progress.gif", lambda p: images[0].save(
            p, format="GIF", save_all=True, append_images=images[1:], duration=200, loop=0))
    if history:
        save_figure(plot_utils.loss_curves(history, title=figure_title), results_dir / "loss_curves.png")

    metrics = {"model": title, "epochs": len(seconds_per_epoch), "config": run_config(args),
               "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "versions": library_versions(), "seconds_per_epoch": [round(s, 3) for s in seconds_per_epoch]}
    if history:
        for name in ("loss", "reconstruction_loss", "kl_loss"):
            metrics[f"final_train_{name}"] = history[name][-1]
            metrics[f"final_test_{name}"] = history[f"val_{name}"][-1]
    metrics.update(evaluate(model, args, figure_title, results_dir, x_test, y_test, mnist, inception, inception_error))
    write_json(results_dir / "metrics.json", metrics)
    print_summary(title, metrics, results_dir)


def main(argv=None, title="Dense VAE", build_encoder=dense_encoder, build_decoder=dense_decoder,
         epochs=30, batch_size=64, results_dir="results/vae", add_arguments=None, xla=True, batches_per_step=67,
         iw_samples=1000):
    """Parse, validate, run; every input error becomes one line and exit code 2.

    xla and batches_per_step shape the fast path per architecture, as measured by
    tests/bench_training.py on CPU: both help the dense model; the convolutional one is many times
    slower with XLA (its CPU convolutions) and gains nothing from groups without it.
    """
    parser = build_parser(__doc__.splitlines()[0] if title == "Dense VAE" else title, epochs, batch_size, results_dir,
                          iw_samples)
    parser.set_defaults(xla=xla, batches_per_step=batches_per_step)
    architecture = parser.add_argument_group("architecture")
    architecture.add_argument("--activation", choices=ACTIVATIONS, default="relu", help="of the hidden layers")
    if add_arguments:
        architecture_options = add_arguments(architecture)
    else:
        architecture.add_argument("--hidden-dim", type=fid.positive_int, default=256, help="units of each hidden layer")
        architecture.add_argument("--hidden-layers", type=fid.positive_int, default=1,
                                  help="hidden layers in the encoder, and as many in the decoder")
        architecture_options = ("hidden_dim", "hidden_layers")
    args = parser.parse_args(argv)
    if args.model and not args.evaluate_only:
        parser.error("--model goes with --evaluate-only")
    if sum((args.resume, args.overwrite, args.evaluate_only)) > 1:
        parser.error("choose one of --resume, --overwrite and --evaluate-only")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a polite kill checkpoints like Ctrl-C
    try:
        run(args, parser, build_encoder, build_decoder, title, RUN_DEFINING + tuple(architecture_options))
    except UsageError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted: the checkpoints and outputs already written are intact")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
