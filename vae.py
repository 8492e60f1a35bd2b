"""Variational autoencoder on MNIST (Kingma & Welling, 2014): the dense model and the whole run.

    python vae.py --latent-dim 2 --epochs 30

Part 1 is the experiment: the model and its loss first (as keras.io's VAE example), then in the
order a run goes: configuration, data, training, evaluation, figures and metrics, main. Part 2 is
the plumbing that keeps long runs safe (data files, the results directory and its lock,
checkpoints and resume, atomic writes) and, last, the speed work (grouped batches and XLA, off
with --plain); the experiment reads without it. conv_vae.py describes its own networks as an
`Architecture` and runs the same pipeline.
"""

import argparse
import copy
import csv
import dataclasses
import fcntl
import gzip
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

import fid
import plot_utils
from fid import RunFailed, UsageError

fid.start_tensorflow()  # before Keras: without TensorFlow's start-up lines
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers, ops  # noqa: E402


# ==============================================================================================
# PART 1: THE EXPERIMENT
# ==============================================================================================

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


def posterior_head(h, latent_dim):
    """(mean, log-variance) of q(z|x). These two layers, the sampling and the decoder's last layer
    (its sigmoid pixels) compute in float32 under any --dtype-policy: in bfloat16 (8 bits of
    mantissa) a mean near 3 moves in steps of 0.016, as large as the posterior's spread, and a
    pixel of 0.998 rounds to 1 (binary cross-entropy to its clip)."""
    z_mean = layers.Dense(latent_dim, name="z_mean", dtype="float32")(h)
    z_log_var = layers.Dense(latent_dim, name="z_log_var", dtype="float32")(h)
    return z_mean, z_log_var


def dense_layers(h, units, count, activation):
    """count Dense(units, activation) layers on h: the hidden stacks of both scripts' networks."""
    for _ in range(count):
        h = layers.Dense(units, activation=activation)(h)
    return h


def conditioned(inputs, h, classes):
    """(the network's inputs, h) with, for a conditional VAE (classes > 0), the one-hot label as
    a second input, set beside h (Sohn, Lee and Yan 2015; the generative model M2 of Kingma et
    al. 2014): the encoder then models q(z|x, y), the decoder p(x|z, y)."""
    if not classes:
        return inputs, h
    label = keras.Input((classes,), name="label")
    return [inputs, label], layers.Concatenate()([h, label])


def dense_encoder(args, image_shape, classes=0):
    """784 -> Dense(hidden, relu) -> (mean, log-variance), as in the original; --hidden-layers
    stacks more hidden layers of the same width."""
    x = keras.Input(image_shape)
    inputs, h = conditioned(x, layers.Flatten()(x), classes)
    h = dense_layers(h, args.hidden_dim, args.hidden_layers, args.activation)
    return keras.Model(inputs, posterior_head(h, args.latent_dim), name="encoder")


def dense_decoder(args, image_shape, classes=0):
    """latent -> Dense(hidden, relu) -> Dense(784, sigmoid), as in the original (mirrors the
    encoder)."""
    z = keras.Input((args.latent_dim,))
    inputs, h = conditioned(z, z, classes)
    h = dense_layers(h, args.hidden_dim, args.hidden_layers, args.activation)
    x_hat = layers.Dense(math.prod(image_shape), activation="sigmoid", dtype="float32")(h)
    return keras.Model(inputs, layers.Reshape(image_shape, dtype="float32")(x_hat),
                       name="decoder")


@keras.saving.register_keras_serializable(package="mnist_vae")
class VAE(keras.Model):
    """Encoder -> Sampling -> decoder, trained on the negative ELBO, the sum of LOSS_TERMS (the
    KL term weighted by beta and the warm-up, see kl_weight). With classes > 0, a conditional VAE:
    every batch comes with its one-hot labels (the condition), which both networks take."""

    def __init__(self, encoder, decoder, likelihood="gaussian", binarize="none", seed=None,
                 beta=1.0, kl_warmup_epochs=0, updates_per_epoch=1, classes=0, **kwargs):
        super().__init__(**kwargs)
        self.classes = classes
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood
        self.binarize = binarize
        self.seed = seed
        self.beta = beta
        self.kl_warmup_epochs = kl_warmup_epochs
        self.updates_per_epoch = updates_per_epoch
        self.sampling = Sampling(seed=seed, dtype="float32")  # see posterior_head
        self.binarize_seed_generator = keras.random.SeedGenerator(
            None if seed is None else seed + 1)
        self.term_trackers = {name: keras.metrics.Mean(name=f"{name}_loss")
                              for name in LOSS_TERMS}
        self.kl_weight_tracker = keras.metrics.Mean(name="kl_weight")
        self.loss_tracker = SumOfTerms(self.term_trackers,
                                       self.kl_weight_tracker if self.weighted else None)

    @property
    def weighted(self):
        return self.beta != 1 or self.kl_warmup_epochs > 0

    @property
    def metrics(self):
        """The total and each loss term; the KL weight too when it is not 1 (so history.csv and
        the curves say so)."""
        return [self.loss_tracker, *self.term_trackers.values(),
                *([self.kl_weight_tracker] if self.weighted else [])]

    def kl_weight(self, updates_done):
        """The KL term's weight in the training objective: beta, reached linearly over the first
        kl_warmup_epochs (epoch e, counted from 0, weighs beta * e / kl_warmup_epochs). A function
        of the optimizer's update count, which checkpoints keep, so a resumed run continues it
        exactly. The test ELBO and the likelihood estimate never use it."""
        if not self.kl_warmup_epochs:
            return self.beta
        epoch = ops.floor(ops.cast(updates_done, "float32") / self.updates_per_epoch)
        return self.beta * ops.minimum(1.0, epoch / self.kl_warmup_epochs)

    def encoded(self, x, condition=None, training=False):
        return self.encoder(x if condition is None else [x, condition], training=training)

    def decoded(self, z, condition=None, training=False):
        return self.decoder(z if condition is None else [z, condition], training=training)

    def call(self, inputs, training=False):
        """inputs: the images, or (images, one-hot labels) for a conditional VAE."""
        x, condition = inputs if self.classes else (inputs, None)
        z = self.sampling(self.encoded(x, condition, training=training))
        return self.decoded(z, condition, training=training)

    def objective(self, x, training, kl_weight=1.0, condition=None):
        """(training loss, {term: batch mean}) of one batch."""
        z_mean, z_log_var = self.encoded(x, condition, training=training)
        x_hat = self.decoded(self.sampling([z_mean, z_log_var]), condition, training=training)
        terms = {name: ops.mean(term.per_image(x=x, x_hat=x_hat, z_mean=z_mean,
                                               z_log_var=z_log_var, likelihood=self.likelihood))
                 for name, term in LOSS_TERMS.items()}
        return weighted_sum(terms, kl_weight), terms

    def track(self, terms, kl_weight):
        """The terms' batch means (the total is their sum: SumOfTerms)."""
        for name, value in terms.items():
            self.term_trackers[name].update_state(value)
        if self.weighted:
            self.kl_weight_tracker.update_state(kl_weight)

    def batch(self, data):
        """(images, their one-hot labels for a conditional VAE, else None) of what fit hands
        over."""
        data = data if isinstance(data, tuple) else (data,)
        return data[0], data[1] if self.classes else None

    def train_step(self, data):
        """One Adam update per batch (the grouped data path hands over several: for_each_batch)."""
        for_each_batch(*self.batch(data), self.update, batch_rank=len(self.decoder.output.shape))
        return self.get_metrics_result()

    def update(self, x, condition=None):
        """One batch: forward, gradients, Adam, loss trackers."""
        if self.binarize == "dynamic":
            noise = keras.random.uniform(ops.shape(x), seed=self.binarize_seed_generator)
            x = ops.cast(noise < x, x.dtype)
        kl_weight = self.kl_weight(self.optimizer.iterations)
        with tf.GradientTape() as tape:
            total, terms = self.objective(x, training=True, kl_weight=kl_weight,
                                          condition=condition)
            scaled = self.optimizer.scale_loss(total)  # mixed_float16: Keras' loss scaling
        gradients = tape.gradient(scaled, self.trainable_weights)
        self.optimizer.apply(gradients, self.trainable_weights)
        self.track(terms, kl_weight)

    def test_step(self, data):
        """The test loss with the weight of the epoch just trained, so train and test curves
        compare."""
        x, condition = self.batch(data)
        kl_weight = (self.kl_weight(ops.maximum(self.optimizer.iterations - 1, 0))
                     if self.kl_warmup_epochs else self.beta)
        _, terms = self.objective(x, training=False, kl_weight=kl_weight, condition=condition)
        self.track(terms, kl_weight)
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
            "classes": self.classes,
        }

    @classmethod
    def from_config(cls, config):
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        config["decoder"] = keras.saving.deserialize_keras_object(config["decoder"])
        return cls(**config)


class SumOfTerms(keras.metrics.Metric):
    """The tracked loss (the logs' and history.csv's `loss`): the tracked terms' means summed, the
    KL's weighted by the epoch's KL weight, when read. Nothing is accumulated for it: a total
    accumulated on its own is an expression of its own in the traced step, which TensorFlow's
    graph optimizer (Grappler) rearranged differently from process to process, so it differed in
    its last bit from the sum of the terms beside it, and a resumed run's from an unbroken one's."""

    def __init__(self, term_trackers, kl_weight_tracker=None, name="loss"):
        super().__init__(name=name)
        self.term_trackers, self.kl_weight_tracker = term_trackers, kl_weight_tracker

    def update_state(self, *args, **kwargs):
        """Nothing to do: the term trackers are updated."""

    def reset_state(self):
        """Nothing to do: the term trackers are reset with the model's other metrics."""

    def result(self):
        means = {name: tracker.result() for name, tracker in self.term_trackers.items()}
        return weighted_sum(means, 1.0 if self.kl_weight_tracker is None
                            else self.kl_weight_tracker.result())


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------

def reconstruction_error(x, x_hat, likelihood):
    """-log p(x|z) per image up to a constant: the original's 784 * MSE, or binary cross-entropy."""
    axes = tuple(range(1, len(x.shape)))
    if likelihood == "gaussian":
        return ops.sum(ops.square(x - x_hat), axis=axes)
    x_hat = ops.clip(x_hat, 1e-7, 1.0 - 1e-7)
    return -ops.sum(x * ops.log(x_hat) + (1.0 - x) * ops.log(1.0 - x_hat), axis=axes)


def kl_divergence(z_mean, z_log_var):
    """KL(q(z|x) || N(0, I)) per image, in closed form."""
    return -0.5 * ops.sum(1.0 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var), axis=-1)


@dataclasses.dataclass(frozen=True)
class LossTerm:
    """A term of the training loss, per image (of x, x_hat, z_mean, z_log_var, likelihood).
    in_elbo: a term of the negative ELBO; the test ELBO and the likelihood estimate are the
    model's whatever else trains it, so they leave out the rest (a regulariser, say)."""

    per_image: Callable
    in_elbo: bool = True


# The training loss, term by term. Everything else follows from this mapping: the trackers and
# history.csv's columns (<term>_loss), the test metrics (test_<term>), the summary; a new term is
# one entry here and its panel in plot_utils.LOSS_PANELS.
LOSS_TERMS = {
    "reconstruction": LossTerm(lambda x, x_hat, likelihood, **_:
                               reconstruction_error(x, x_hat, likelihood)),
    "kl": LossTerm(lambda z_mean, z_log_var, **_: kl_divergence(z_mean, z_log_var)),
}


def elbo(terms):
    """The ELBO per image from {term: per-image values}: minus the sum of the ELBO's terms."""
    return -sum(values for name, values in terms.items() if LOSS_TERMS[name].in_elbo)


def weighted_sum(terms, kl_weight):
    """The training loss from its terms (values or batch means), the KL weighted."""
    weighted = [kl_weight * value if name == "kl" else value for name, value in terms.items()]
    return sum(weighted[1:], start=weighted[0])


def log_likelihood_constant(num_pixels, likelihood):
    """What turns the reconstruction error into true nats: squared error is -log N(x; x_hat, 1/2)
    less 0.5 * log(pi) per pixel (392 * log(pi) = 448.7 nats for MNIST); cross-entropy needs
    nothing."""
    return 0.5 * num_pixels * math.log(math.pi) if likelihood == "gaussian" else 0.0


def loss_unit(likelihood, image_shape):
    """The loss curves' unit: the training loss is nats per image less the Gaussian decoder's
    constant (log_likelihood_constant), which the original's squared error leaves out."""
    constant = log_likelihood_constant(math.prod(image_shape), likelihood)
    return f"nats per image − {constant:.1f}" if constant else "nats per image"


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

TEST_BINARIZATION_SEED = 0  # the binarized test set is the same for every run, so results compare
MANIFOLD_SIZE = 30  # the manifold figure decodes a 30 x 30 grid of z ...
MANIFOLD_LIMIT = 4.0  # ... over [-4, 4]^2
CLASS_MANIFOLD_SIZE = 10  # a conditional VAE's: 10 x 10 per class
INTERPOLATION_STEPS = 10
WATCHED_IMAGES, WATCHED_SAMPLES = 10, 20  # what each progress frame shows
DTYPE_POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
ACTIVATIONS = ("relu", "elu", "gelu", "silu", "tanh")
# Every option of the model, data and architecture groups defines a run (a resumed run must
# agree on it) but these: --epochs extends a run, --plain is the same maths at another speed,
# --data says where the files are.
REDEFINABLE = ("epochs", "plain", "data")


def build_parser(architecture):
    """The command line; returns (parser, {option: default} of the options that define a run)."""
    parser = fid.OneLineErrorParser(prog=architecture.script, description=architecture.description,
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train = parser.add_argument_group("model and training")
    train.add_argument("--latent-dim", type=fid.positive_int, default=2, help="size of z")
    train.add_argument("--epochs", type=fid.positive_int, default=architecture.epochs,
                       help="total epochs to train to")
    train.add_argument("--batch-size", type=fid.positive_int, default=architecture.batch_size,
                       help="images per step")
    train.add_argument("--learning-rate", type=fid.positive_float, default=1e-3,
                       help="Adam learning rate")
    train.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                       help="cosine: decay the learning rate to 0 along a half cosine over the "
                            "--epochs of the run (Loshchilov & Hutter, 2017); it ends with the "
                            "run, so --resume cannot extend it")
    train.add_argument("--seed", type=int, default=0,
                       help="seed for weights, shuffling, sampling and evaluation")
    train.add_argument("--likelihood", choices=("gaussian", "bernoulli"), default="gaussian",
                       help="decoder p(x|z): gaussian is the original 784*MSE loss, bernoulli is "
                            "binary cross-entropy")
    train.add_argument("--binarize", choices=("none", "dynamic"), default="none",
                       help="dynamic: resample binary pixels ~ Bernoulli(intensity) at each use "
                            "(test set: once, fixed)")
    train.add_argument("--beta", type=fid.positive_float, default=1.0,
                       help="weight of the KL term in the training loss (beta-VAE); 1 is the "
                            "ELBO. The test ELBO and likelihood estimate always weigh it 1")
    train.add_argument("--kl-warmup-epochs", type=fid.non_negative_int, default=0,
                       help="raise the KL weight linearly from 0 to --beta over the first N "
                            "epochs (KL annealing)")
    train.add_argument("--dtype-policy", choices=DTYPE_POLICIES, default="float32",
                       help="Keras dtype policy: mixed_* computes the VAE's layers in 16 bits, in "
                            "training and in the likelihood estimate; its variables, the loss, "
                            "the ELBO and the FID networks stay float32. mixed_bfloat16 pays for "
                            "conv_vae.py on CPUs with AMX (1.4x float32); without AMX it is "
                            "slower (AVX2: 2x slower)")
    train.add_argument("--conditional", action="store_true",
                       help="a conditional VAE: the label (one-hot, of the data's own classes) "
                            "enters the encoder and the decoder, so that samples are of the class "
                            "asked for (Sohn et al. 2015); figures and metrics per class follow")
    train.add_argument("--plain", action="store_true",
                       help="plain Keras training (arrays into fit, one batch per step, no XLA, "
                            "Keras' own dropout): same maths, slower; the speed baseline")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=tuple(DATASETS), default="mnist",
                      help="Keras' download when --data is not given; with --data, which labels "
                           "its files hold (class names in the figures)")
    data.add_argument("--data", default=None,
                      help="an .npz (x_train, y_train, x_test, y_test) or a folder of the four "
                           "MNIST IDX files; default: Keras' download of --dataset")
    data.add_argument("--train-size", type=fid.positive_int, default=None,
                      help="train on the first N images (quick runs)")
    data.add_argument("--test-size", type=fid.positive_int, default=None,
                      help="evaluate on the first N test images")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--fid", type=fid_kinds, default="pixel,classifier",
                            help="FIDs to report: none, all, or a comma-separated subset of pixel "
                                 "(the original's metric), classifier (features of a digit "
                                 "classifier trained on --data: MNIST's is committed, others "
                                 "are trained once and cached) and inception (the "
                                 "standard FID; about 10 min per 10,000 images on a CPU)")
    evaluation.add_argument("--fid-samples", type=fid.positive_int, default=10000,
                            help="prior samples compared with the test images")
    evaluation.add_argument("--inception-weights", default="imagenet",
                            help="'imagenet' (Keras download) or a path to InceptionV3 weights "
                                 "for offline machines")
    evaluation.add_argument("--fid-batch-size", type=fid.positive_int, default=50,
                            help="images per Inception batch")
    evaluation.add_argument("--iw-samples", type=fid.non_negative_int,
                            default=architecture.iw_samples,
                            help="K of the importance-weighted log-likelihood estimate; 0 skips it")
    runs = parser.add_argument_group("outputs and long runs")
    runs.add_argument("--results-dir", default=architecture.results_dir,
                      help="where every output and checkpoint goes")
    runs.add_argument("--tensorboard", action="store_true",
                      help="log loss terms and progress frames to <results-dir>/tensorboard/ "
                           "(tensorboard --logdir results)")
    runs.add_argument("--resume", action="store_true",
                      help="continue the run in --results-dir to --epochs")
    runs.add_argument("--from-previous-checkpoint", action="store_true",
                      help="with --resume: continue from the checkpoint before the latest (kept "
                           "for when the latest file is damaged)")
    runs.add_argument("--overwrite", action="store_true",
                      help="replace a run already in --results-dir")
    runs.add_argument("--evaluate-only", action="store_true",
                      help="rebuild figures and metrics from the saved model, without training")
    runs.add_argument("--model", default=None,
                      help="with --evaluate-only: a .keras file instead of "
                           "<results-dir>/model.keras")
    networks = parser.add_argument_group("architecture")
    networks.add_argument("--activation", choices=ACTIVATIONS, default="relu",
                          help="of the hidden layers")
    architecture.add_options(networks)
    defining = [action.dest for group in (train, data, networks)
                for action in group._group_actions  # argparse keeps no public list
                if action.dest not in REDEFINABLE]
    return parser, {key: parser.get_default(key) for key in defining}


def add_dense_options(group):
    group.add_argument("--hidden-dim", type=fid.positive_int, default=256,
                       help="units of each hidden layer")
    group.add_argument("--hidden-layers", type=fid.positive_int, default=1,
                       help="hidden layers in the encoder, and as many in the decoder")


def fid_kinds(text):
    """--fid: none, all, or a comma-separated subset of fid.FEATURE_KINDS, in canonical order."""
    if text in ("none", "all"):
        return () if text == "none" else fid.FEATURE_KINDS
    kinds = [kind.strip() for kind in text.split(",")]
    unknown = [kind for kind in kinds if kind not in fid.FEATURE_KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown FID {unknown[0]!r}: give none, all, or a "
                                         f"comma-separated subset of {','.join(fid.FEATURE_KINDS)}")
    return tuple(kind for kind in fid.FEATURE_KINDS if kind in kinds)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

DATASETS = {  # --dataset: Keras' download, the name in figures, and the class names
    "mnist": (keras.datasets.mnist, "MNIST", tuple("0123456789")),
    "fashion_mnist": (keras.datasets.fashion_mnist, "Fashion-MNIST", (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
        "Ankle boot")),
}


def load_dataset(path=None, dataset="mnist"):
    """(x_train, y_train, x_test, y_test) as uint8 images and integer labels, from an .npz, a
    folder of IDX files or Keras' download of the dataset; checked before any training."""
    module, name, class_names = DATASETS[dataset]
    if path is None:
        try:
            (x_train, y_train), (x_test, y_test) = module.load_data()
        except Exception as e:
            raise UsageError(f"cannot download {name} ({type(e).__name__}); "
                             "pass --data PATH to a local copy") from None
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
    check_arrays(arrays, source, len(class_names))
    return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]


def to_float_images(x):
    """uint8 (N, H, W) -> float32 (N, H, W, 1) in [0, 1]."""
    return (x.astype(np.float32) / 255.0)[..., None]


def one_hot(labels, classes):
    return np.eye(classes, dtype=np.float32)[labels]


def balanced_labels(count, classes):
    """0, 1, ..., classes - 1, 0, 1, ...: the labels a conditional VAE's samples are asked for."""
    return np.arange(count) % classes


def binarize_once(x, seed):
    """A Bernoulli(intensity) draw of every pixel: the fixed binarized test set."""
    return (np.random.default_rng(seed).random(x.shape, dtype=np.float32) < x).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def build_model(args, architecture, image_shape, updates_per_epoch=1):
    """A new VAE whose layers compute in args.dtype_policy. The policy is Keras' global setting
    while the layers are made (each keeps its own, and model.keras saves it), then back to float32
    so that nothing built later, such as the FID classifier, inherits it."""
    classes = len(DATASETS[args.dataset][2]) if args.conditional else 0
    keras.config.set_dtype_policy(args.dtype_policy)
    try:
        return VAE(architecture.build_encoder(args, image_shape, classes),
                   architecture.build_decoder(args, image_shape, classes),
                   likelihood=args.likelihood, binarize=args.binarize, seed=args.seed,
                   beta=args.beta, kl_warmup_epochs=args.kl_warmup_epochs,
                   updates_per_epoch=updates_per_epoch, classes=classes)
    finally:
        keras.config.set_dtype_policy("float32")


def compile_model(model, args, xla):
    learning_rate = args.learning_rate
    if args.lr_schedule == "cosine":  # a function of the update count: checkpoints keep both
        learning_rate = keras.optimizers.schedules.CosineDecay(
            learning_rate, args.epochs * model.updates_per_epoch)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  jit_compile=xla and not args.plain)
    # Adam's variables now: created inside the first traced step, they would make TensorFlow
    # trace (and with XLA compile) that step twice.
    model.optimizer.build(model.trainable_variables)


def train(model, args, architecture, title, results_dir, x_train, x_test, state, resume_command,
          labels=None):
    """model.fit from the checkpointed epoch, one callback per job; returns the Checkpoints
    callback (history, timings). The progress frames show the first test images and a few prior
    samples, the same every epoch. resume_command: what an interrupted run tells the user.
    labels: the one-hot labels of both sets, for a conditional VAE."""
    checkpoints = Checkpoints(results_dir, config=run_config(args), resumed_from=state)
    watch_z = np.random.default_rng(args.seed + 2).standard_normal(
        (WATCHED_SAMPLES, args.latent_dim)).astype(np.float32)
    watch_labels = labels and (labels[1][:WATCHED_IMAGES], one_hot(
        balanced_labels(WATCHED_SAMPLES, model.classes), model.classes))
    frames = ProgressFrames(results_dir, x_test[:WATCHED_IMAGES], watch_z, checkpoints,
                            watch_labels)
    unit = loss_unit(args.likelihood, x_test.shape[1:])
    callbacks = [frames, checkpoints,  # each epoch's frame is saved before its checkpoint
                 HistoryCSV(results_dir, checkpoints),
                 LossCurves(results_dir, title, unit, checkpoints),
                 keras.callbacks.TerminateOnNaN(), InterruptAtBatchEnd()]
    if args.tensorboard:  # after the checkpoint: an epoch is logged once it is committed, so a
        # resume that repeats an uncommitted epoch never logs a step twice
        tensorboard_dir = results_dir / "tensorboard"
        callbacks += [keras.callbacks.TensorBoard(log_dir=str(tensorboard_dir), write_graph=False),
                      TensorBoardFrames(tensorboard_dir / "progress", frames)]
    (results_dir / "metrics.json").unlink(missing_ok=True)  # it describes a model this run
    # replaces; its absence also tells --resume that an evaluation did not finish
    fit_data, batches_per_step = training_data(args, architecture, x_train, x_test,
                                               checkpoints.epochs_done, labels)
    callbacks.append(BatchProgress(len(x_train), args.batch_size, batches_per_step))
    model.steps_per_execution = 1  # one batch, or one group of batches, per call
    try:
        model.fit(**fit_data, epochs=args.epochs, initial_epoch=checkpoints.epochs_done,
                  callbacks=callbacks, verbose=0)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{count_of(checkpointed_epochs(results_dir), 'complete epoch')} "
                                f"checkpointed in {results_dir}.\nresume with: {resume_command}"
                                ) from None
    except OSError as e:  # e.g. the disk filled up while writing a checkpoint
        saved = count_of(checkpointed_epochs(results_dir), "epoch")
        raise RunFailed(f"cannot write a checkpoint in {results_dir} ({e.strerror or e}); the last "
                        f"complete one ({saved}) is intact. Free space, then: {resume_command}"
                        ) from None
    if checkpoints.diverged_epoch:
        saved = checkpointed_epochs(results_dir)
        kept = (f"the last good checkpoint ({count_of(saved, 'epoch')}) is kept in {results_dir}"
                if saved else "no epoch completed, so there is no checkpoint")
        raise RunFailed(f"the loss became NaN or infinite in epoch {checkpoints.diverged_epoch}; "
                        f"training stopped and {kept}. Try a smaller --learning-rate.")
    return checkpoints


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

def encode(model, x, condition=None):
    """Posterior means and log-variances of all images (condition: their one-hot labels, for a
    conditional VAE)."""
    z_mean, z_log_var = fid.in_batches(model.encoder, x if condition is None else [x, condition])
    return z_mean, z_log_var


def decode(model, z, condition=None):
    return fid.in_batches(model.decoder, z if condition is None else [z, condition])


def evaluate_elbo(model, x, seed, posterior=None, condition=None):
    """One z ~ q(z|x) per test image with fixed noise (deterministic, unlike a fit-time metric).

    Returns the reconstructions (as the original's `vae.predict`) and {term: per-image values} in
    nats (the reconstruction term with its constant, so the ELBO is minus their sum).
    posterior: (z_mean, z_log_var) of x, when the caller has already encoded it; condition: the
    one-hot labels of a conditional VAE.
    """
    z_mean, z_log_var = posterior or encode(model, x, condition)
    epsilon = np.random.default_rng(seed).standard_normal(z_mean.shape).astype(np.float32)
    reconstructions = decode(model, z_mean + np.exp(0.5 * z_log_var) * epsilon, condition)
    terms = {name: ops.convert_to_numpy(term.per_image(x=x, x_hat=reconstructions, z_mean=z_mean,
                                                       z_log_var=z_log_var,
                                                       likelihood=model.likelihood))
             for name, term in LOSS_TERMS.items()}
    terms["reconstruction"] = terms["reconstruction"] + log_likelihood_constant(
        math.prod(x.shape[1:]), model.likelihood)
    return reconstructions, terms


def interpolate(model, x, labels, z_mean, class_names, steps=INTERPOLATION_STEPS):
    """Straight latent paths between posterior means, decoded at `steps` points: from the first
    test image of each class to the first of the class 3 after it (where both are present); when
    no such pair exists (a single class), between consecutive test images. A conditional VAE's
    one-hot label moves along the same straight path. Returns (start images, decodings (pairs,
    steps, ...), end images, row labels)."""
    firsts = {label: np.flatnonzero(labels == label)[0] for label in np.unique(labels)}
    pairs = [(firsts[label], firsts[(label + 3) % len(class_names)]) for label in sorted(firsts)
             if (label + 3) % len(class_names) in firsts]
    if not pairs:
        pairs = [(i, i + 1) for i in range(0, min(len(x), 2 * len(class_names)) - 1, 2)]
    starts, ends = np.array([a for a, _ in pairs], int), np.array([b for _, b in pairs], int)
    t = np.linspace(0, 1, steps, dtype=np.float32)[None, :, None]
    paths = (1 - t) * z_mean[starts][:, None] + t * z_mean[ends][:, None]
    condition = None
    if model.classes:
        start_labels, end_labels = (one_hot(labels[ends_], model.classes)[:, None]
                                    for ends_ in (starts, ends))
        condition = ((1 - t) * start_labels + t * end_labels).reshape(-1, model.classes)
    decoded = decode(model, paths.reshape(-1, z_mean.shape[1]), condition).reshape(
        len(pairs), steps, *x.shape[1:])
    names = [f"{class_names[labels[a]]} \N{RIGHTWARDS ARROW} {class_names[labels[b]]}"
             for a, b in pairs]
    return x[starts], decoded, x[ends], names


ACTIVE_UNIT_THRESHOLD = 0.01  # Burda, Grosse and Salakhutdinov (2016), section 5.2


def latent_usage(z_mean, z_log_var):
    """Which latent dimensions the model uses, from the test set's posteriors: a dimension is an
    active unit when its posterior mean varies over the test images, Cov_x(E_q(z|x)[z_d]) > 0.01
    (Burda et al. 2016); a collapsed one has the prior as its posterior for every image, and a KL
    near 0 (kl_per_dimension, nats per image, averaged over the test set)."""
    activity = np.var(z_mean.astype(np.float64), axis=0)
    kl = ops.convert_to_numpy(kl_divergence(z_mean[..., None], z_log_var[..., None]))
    return {"active_units": int(np.sum(activity > ACTIVE_UNIT_THRESHOLD)),
            "kl_per_dimension": [float(value) for value in np.mean(kl, axis=0)]}


def standard_normal_log_density(x):
    return -0.5 * (math.log(2 * math.pi) + ops.square(x))


# Bytes of decoder activations per call of the likelihood estimate: a bound on its memory, and a
# speed setting: the convolutional decoder ran 1.15x to 1.24x faster at ~400 samples a call (128 MB)
# than at ~1,800 (512 MB), the same digits (results/README.md, Evaluation and its cost).
IW_DECODER_MEMORY = 128 * 2**20


def importance_weighted_log_likelihood(model, x, num_samples, seed, images_per_batch=100,
                                       samples_per_chunk=None, xla=True, verbose=True,
                                       posterior=None, decoder_memory=IW_DECODER_MEMORY,
                                       condition=None):
    """log p(x) ~ log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x) (Burda et al. 2016), per image
    (for a conditional VAE, with condition the images' one-hot labels: log p(x|y)).

    Images go through in batches and their K samples in chunks, so memory stays bounded; the
    log-weights of one batch are combined with log-sum-exp, which is stable for any magnitude.
    A chunk whose decoded samples would hold more than decoder_memory bytes is decoded a few
    images at a time (the convolutional decoder's activations are 30x the dense one's); the noise
    is drawn per chunk either way, so the estimate does not depend on the memory limit.
    """
    constant = log_likelihood_constant(math.prod(x.shape[1:]), model.likelihood)
    samples_per_chunk = samples_per_chunk or max(1, min(num_samples, 20000 // images_per_batch))
    decodes_per_call = max(1, decoder_memory // decoded_image_bytes(model.decoder))

    @tf.function(jit_compile=xla)
    def log_weights(x_batch, z_mean, z_log_var, epsilon, *condition):
        z = z_mean[:, None, :] + ops.exp(0.5 * z_log_var)[:, None, :] * epsilon
        log_q = ops.sum(standard_normal_log_density(epsilon) - 0.5 * z_log_var[:, None, :], axis=-1)
        log_prior = ops.sum(standard_normal_log_density(z), axis=-1)
        batch, chunk, latent = ops.shape(epsilon)
        x_hat = model.decoded(ops.reshape(z, (batch * chunk, latent)),
                              ops.repeat(condition[0], chunk, axis=0) if condition else None)
        x_repeated = ops.repeat(x_batch, chunk, axis=0)
        log_px = -(reconstruction_error(x_repeated, x_hat, model.likelihood) + constant)
        return ops.reshape(log_px, (batch, chunk)) + log_prior - log_q

    rng = np.random.default_rng(seed)
    z_mean, z_log_var = posterior or encode(model, x, condition)
    estimates = np.empty(len(x))
    progress = ProgressAfterWarmup(len(x), f"importance-weighted log-likelihood (K={num_samples})",
                                   "--iw-samples 0 skips it", verbose)
    for begin in range(0, len(x), images_per_batch):
        end = min(begin + images_per_batch, len(x))
        chunks = []
        for done in range(0, num_samples, samples_per_chunk):
            size = min(samples_per_chunk, num_samples - done)
            epsilon = rng.standard_normal((end - begin, size, z_mean.shape[1])).astype(np.float32)
            calls = math.ceil((end - begin) / max(1, decodes_per_call // size))
            step = math.ceil((end - begin) / calls)  # even calls: 50 + 50, not 99 + 1 (a retrace)
            pieces = [slice(i, min(i + step, end)) for i in range(begin, end, step)]
            chunks.append(ops.concatenate([
                log_weights(x[part], z_mean[part], z_log_var[part],
                            epsilon[part.start - begin:part.stop - begin],
                            *([] if condition is None else [condition[part]]))
                for part in pieces], axis=0))
        all_weights = ops.concatenate(chunks, axis=1)
        estimates[begin:end] = (ops.convert_to_numpy(ops.logsumexp(all_weights, axis=1))
                                - math.log(num_samples))
        progress.update(end)
    return estimates


def fids(args, test_images, reconstructions, samples, dataset, inception, inception_error):
    """Each FID of args.fid, of the reconstructions and of the prior samples against the test
    images; in the classifier's and Inception's features also KID and precision / recall /
    density / coverage (fid.py), which tell apart what FID folds into one number: samples unlike
    the data (precision, density) and parts of the data no sample reaches (recall, coverage).

    The classifier is that of the whole training split of the data (dataset: the four arrays),
    whatever --train-size, so every run on the same data shares one classifier (MNIST's is
    committed; fid.load_or_train_classifier).
    """
    results, networks, seconds = {}, {"pixel": None} if "pixel" in args.fid else {}, {}
    start = time.perf_counter()
    if "classifier" in args.fid:
        networks["classifier"] = fid.load_or_train_classifier(
            *dataset, skip_hint="; leave classifier out of --fid to skip it")
        results["classifier_test_accuracy"] = networks["classifier"].test_accuracy
        seconds["classifier_setup"] = time.perf_counter() - start
    if "inception" in args.fid:
        if inception is None:
            results.update(fid_inception_recon=None, fid_inception_samples=None,
                           fid_inception_error=inception_error)
        else:
            networks["inception"] = inception
    for kind, network in networks.items():
        start = time.perf_counter()
        options = dict(network=network, batch_size=args.fid_batch_size,
                       verbose=kind == "inception",
                       skip_hint=f"; leave {kind} out of --fid to skip it")
        cache_dir = None if kind == "pixel" else fid.default_cache_dir()
        real = fid.compute_features(test_images, kind, **options, cache_dir=cache_dir)
        real_statistics = fid.statistics_from_features(real, kind)
        # what KID and the k-NN metrics compute of the test set: once, and kept in the cache
        with fid.test_set_parts(real, cache_dir) as reuse:
            for name, images in (("recon", reconstructions), ("samples", samples)):
                if kind == "inception":
                    print(f"Inception features of the {name}:")
                fake = fid.compute_features(images, kind, **options)
                results[f"fid_{kind}_{name}"] = fid.frechet_distance(
                    real_statistics, fid.statistics_from_features(fake, kind))
                if kind != "pixel":
                    results.update(kernel_and_manifold_metrics(real, fake, f"{kind}_{name}",
                                                               reuse))
        seconds[kind] = time.perf_counter() - start
    return {**results, "fid_seconds": {step: round(value, 2) for step, value in seconds.items()}}


def kernel_and_manifold_metrics(real, fake, suffix, reuse):
    """KID (mean and standard deviation over subsets of up to 1,000) and the k-NN manifold
    metrics of one feature comparison, named <metric>_<suffix>."""
    subset_size = min(fid.KID_SUBSET_SIZE, len(real), len(fake))
    kid, kid_std = fid.kernel_distance(real, fake, subset_size=subset_size, reuse=reuse)
    metrics = {f"kid_{suffix}": kid, f"kid_{suffix}_std": kid_std}
    for name, value in fid.precision_recall_density_coverage(real, fake, reuse=reuse).items():
        metrics[f"{name}_{suffix}"] = value
    return metrics


# ----------------------------------------------------------------------------------------------
# Figures and metrics
# ----------------------------------------------------------------------------------------------

def evaluate(model, args, title, results_dir, x_test, y_test, dataset, inception, inception_error,
             xla=True):
    """Figures, ELBO, importance-weighted log-likelihood and FIDs; deterministic for a seed."""
    start = time.perf_counter()
    metrics = {}
    test_images = (binarize_once(x_test, TEST_BINARIZATION_SEED) if args.binarize == "dynamic"
                   else x_test)
    test_labels = one_hot(y_test, model.classes) if model.classes else None
    posterior = encode(model, test_images, test_labels)
    reconstructions, terms = evaluate_elbo(model, test_images, args.seed, posterior, test_labels)
    metrics["test_elbo"] = float(np.mean(elbo(terms)))
    metrics.update({f"test_{name}": float(np.mean(values)) for name, values in terms.items()})
    metrics.update(latent_usage(*posterior))
    class_names = DATASETS[args.dataset][2]
    named_classes = None if args.dataset == "mnist" else class_names  # digits label themselves
    save_figure(plot_utils.reconstructions(test_images[:100], reconstructions[:100], title=title,
                                           items="digits" if named_classes is None else "images"),
                results_dir / "reconstruction_images.png")

    z_mean = posterior[0]
    save_figure(plot_utils.latent_space(z_mean, y_test, title=title, class_names=named_classes),
                results_dir / "latent_space_representation.png")
    save_figure(plot_utils.interpolation(*interpolate(model, test_images, y_test, z_mean,
                                                      class_names), title=title,
                                         conditional=bool(model.classes)),
                results_dir / "interpolation.png")
    if z_mean.shape[1] == 2 and not model.classes:
        grid = np.linspace(-MANIFOLD_LIMIT, MANIFOLD_LIMIT, MANIFOLD_SIZE, dtype=np.float32)
        z_grid = np.stack(np.meshgrid(grid, grid[::-1]), axis=-1).reshape(-1, 2)  # row 0: top z[1]
        cells = decode(model, z_grid).reshape(MANIFOLD_SIZE, MANIFOLD_SIZE, *x_test.shape[1:3])
        save_figure(plot_utils.manifold(cells, grid, title=title), results_dir / "manifold.png")
    elif z_mean.shape[1] == 2:  # one panel per class, of fewer digits
        grid = np.linspace(-MANIFOLD_LIMIT, MANIFOLD_LIMIT, CLASS_MANIFOLD_SIZE, dtype=np.float32)
        z_grid = np.stack(np.meshgrid(grid, grid[::-1]), axis=-1).reshape(-1, 2)
        cells = np.stack([decode(model, z_grid, one_hot(np.full(len(z_grid), label),
                                                        model.classes))
                          for label in range(model.classes)])
        save_figure(plot_utils.class_manifolds(
            cells.reshape(model.classes, CLASS_MANIFOLD_SIZE, CLASS_MANIFOLD_SIZE,
                          *x_test.shape[1:3]), grid, class_names, title=title),
            results_dir / "manifold.png")
    else:
        print(f"note: latent dimension {z_mean.shape[1]}: the 2-D manifold figure is skipped")

    prior_rng = np.random.default_rng(args.seed + 1)
    count = args.fid_samples if args.fid else 100  # the figure shows the first 100 either way
    z_prior = prior_rng.standard_normal((count, z_mean.shape[1])).astype(np.float32)
    sample_labels = balanced_labels(count, model.classes) if model.classes else None
    samples = decode(model, z_prior, None if sample_labels is None
                     else one_hot(sample_labels, model.classes))
    save_figure(plot_utils.samples(samples[:100], title=title), results_dir / "samples.png")
    if model.classes:
        conditional_figures(model, title, results_dir, test_images, y_test, z_mean, samples,
                            class_names)

    if args.iw_samples:
        iw_start = time.perf_counter()
        log_likelihood = importance_weighted_log_likelihood(
            model, test_images, args.iw_samples, args.seed, xla=xla, posterior=posterior,
            condition=test_labels)
        metrics.update(test_log_likelihood_iw=float(np.mean(log_likelihood)),
                       iw_samples=args.iw_samples,
                       iw_seconds=round(time.perf_counter() - iw_start, 2))
    metrics.update(fids(args, test_images, reconstructions, samples, dataset, inception,
                        inception_error))
    if model.classes and "classifier" in args.fid:
        metrics.update(conditional_metrics(dataset, test_images, y_test, samples, sample_labels))
    metrics["evaluation_seconds"] = round(time.perf_counter() - start, 2)
    return metrics


def conditional_figures(model, title, results_dir, test_images, y_test, z_mean, samples,
                        class_names):
    """A conditional VAE's own figures: its prior samples by class (the samples are asked for
    the classes in turn: balanced_labels), and analogies, the first test image of each class
    (or the first ten, with one class) decoded from its z with every label."""
    classes = model.classes
    per_class = len(samples) // classes
    shown = min(WATCHED_IMAGES, per_class)
    by_class = samples[:shown * classes].reshape(shown, classes, *samples.shape[1:])
    save_figure(plot_utils.conditional_samples(by_class.swapaxes(0, 1), class_names,
                                               title=title),
                results_dir / "conditional_samples.png")
    firsts = [np.flatnonzero(y_test == label)[0] for label in np.unique(y_test)]
    rows = np.array(firsts if len(firsts) > 1 else range(min(WATCHED_IMAGES, len(y_test))))
    z = np.repeat(z_mean[rows], classes, axis=0)
    every_label = one_hot(np.tile(np.arange(classes), len(rows)), classes)
    decoded = decode(model, z, every_label).reshape(len(rows), classes, *test_images.shape[1:])
    save_figure(plot_utils.analogies(test_images[rows], decoded, class_names, title=title),
                results_dir / "analogies.png")


def conditional_metrics(dataset, test_images, y_test, samples, sample_labels):
    """Whether a conditional VAE's samples are of the class asked for: label_accuracy, the share
    of samples the data's own classifier (the classifier FID's) assigns to their requested class;
    and per class, the FID and KID in its features between the test images of the class and the
    samples asked for it (None where a class has too few of either)."""
    classifier = fid.load_or_train_classifier(*dataset, verbose=False)
    metrics = {"label_accuracy": fid.classifier_accuracy(classifier, samples, sample_labels)}
    real = fid.compute_features(test_images, "classifier", classifier, verbose=False,
                                cache_dir=fid.default_cache_dir())  # fids() cached them
    fake = fid.compute_features(samples, "classifier", classifier, verbose=False)
    fids_, kids = [], []
    for label in range(int(sample_labels.max()) + 1):
        a, b = real[y_test == label], fake[sample_labels == label]
        if min(len(a), len(b)) < 2:
            fids_.append(None)
            kids.append(None)
            continue
        fids_.append(fid.frechet_distance(fid.statistics_from_features(a, "classifier"),
                                          fid.statistics_from_features(b, "classifier")))
        kids.append(fid.kernel_distance(a, b, subset_size=min(fid.KID_SUBSET_SIZE, len(a),
                                                              len(b)))[0])
    return {**metrics, "fid_classifier_per_class": fids_, "kid_classifier_per_class": kids}


def print_summary(title, metrics, results_dir):
    """The run's numbers (fid.RUN_METRICS, and each loss term's test value) with their units,
    after a headline: the original repository's metric and the ELBO."""
    print(f"\n{title}: {count_of(metrics['epochs'], 'epoch')}, results in {results_dir}/")
    headline = {"fid_pixel_recon": ("pixel FID of the reconstructions (the original's metric)", ""),
                "test_elbo": ("test ELBO", " nats per image")}
    print("  " + ", ".join(f"{label} {metrics[key]:.3f}{unit}"
                           for key, (label, unit) in headline.items()
                           if metrics.get(key) is not None) + "\n")
    shown = {key: (metric.digits, metric.unit) for key, metric in fid.RUN_METRICS.items()}
    terms = {f"test_{name}": (3, "nats per image") for name in LOSS_TERMS}
    order = list(shown)
    order[order.index("test_elbo") + 1:order.index("test_elbo") + 1] = terms
    for key in order:
        if key in metrics and key not in headline:
            digits, unit = {**shown, **terms}[key]
            value = "null" if metrics[key] is None else f"{metrics[key]:.{digits}f}"
            print(f"  {key:30s} {value:>10s}  {unit}".rstrip())
    for key, digits, unit in (("kl_per_dimension", 3, "  nats per image"),
                              ("fid_classifier_per_class", 1, ""),
                              ("kid_classifier_per_class", 2, "")):
        if key in metrics:
            values = ", ".join("null" if value is None else f"{value:.{digits}f}"
                               for value in metrics[key])
            print(f"  {key:30s} {values}{unit}")
    if metrics.get("seconds_per_epoch"):
        print(f"  {'median seconds per epoch':30s} {np.median(metrics['seconds_per_epoch']):10.2f}")


# ----------------------------------------------------------------------------------------------
# The run, and main
# ----------------------------------------------------------------------------------------------

def run(args, architecture, run_defining, resume_command):
    """Check, load, train (or resume), evaluate: every output lands in args.results_dir."""
    results_dir, state = check_results_dir(args, run_defining)
    model = (load_saved_model(Path(args.model) if args.model else results_dir / "model.keras")
             if args.evaluate_only else None)
    args = settled_options(args, state, run_defining, model)
    dataset = load_dataset(args.data, args.dataset)
    title = architecture.title
    figure_title = title if args.dataset == "mnist" else f"{title} on {DATASETS[args.dataset][1]}"
    x_train, y_train, x_test, y_test = dataset
    x_train, y_train = to_float_images(x_train[:args.train_size]), y_train[:args.train_size]
    x_test, y_test = to_float_images(x_test[:args.test_size]), y_test[:args.test_size]
    classes = len(DATASETS[args.dataset][2])
    labels = (one_hot(y_train, classes), one_hot(y_test, classes)) if args.conditional else None
    check_evaluation_needs(args, architecture, x_test.shape)
    inception, inception_error = prepare_inception(args)
    xla = use_xla(architecture, args, len(x_train))

    if args.evaluate_only:
        history = state["history"] if state else None
        seconds_per_epoch = state["seconds_per_epoch"] if state else []
    else:
        keras.utils.set_random_seed(args.seed)
        if state:
            model = restore_checkpoint(results_dir, state)
            print(f"resuming from epoch {state['epochs_done']} of {args.epochs}"
                  if state["epochs_done"] < args.epochs else
                  f"training finished ({count_of(state['epochs_done'], 'epoch')}) but its "
                  "evaluation did not: completing it")
        else:
            model = build_model(args, architecture, x_train.shape[1:],
                                math.ceil(len(x_train) / args.batch_size))
            model((x_train[:1], labels[0][:1]) if labels else x_train[:1])  # builds the weights,
            # so checkpoints hold them from epoch 1
            compile_model(model, args, xla)
        checkpoints = train(model, args, architecture, figure_title, results_dir, x_train,
                            x_test, state, resume_command, labels)
        history, seconds_per_epoch = checkpoints.history, checkpoints.seconds_per_epoch
        save_model(model, results_dir / "model.keras")
    if (results_dir / PROGRESS_FRAMES).is_file():  # also drawn again by --evaluate-only
        save_progress_animation(results_dir)
    if history:
        save_figure(plot_utils.loss_curves(history, title=figure_title,
                                           unit=loss_unit(args.likelihood, x_test.shape[1:])),
                    results_dir / "loss_curves.png")

    metrics = {"model": title, "epochs": len(seconds_per_epoch), "config": run_config(args),
               "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "versions": library_versions(), "machine": machine_record(),
               "seconds_per_epoch": [round(s, 3) for s in seconds_per_epoch]}
    if history:
        for name in (name for name in history if name.endswith("loss") and "val_" not in name):
            metrics[f"final_train_{name}"] = history[name][-1]
            metrics[f"final_test_{name}"] = history[f"val_{name}"][-1]
    metrics.update(evaluate(model, args, figure_title, results_dir, x_test, y_test, dataset,
                            inception, inception_error, xla=xla))
    write_json(results_dir / "metrics.json", metrics)
    print_summary(title, metrics, results_dir)


def command_to_resume(architecture, argv):
    """The command line of this run with --resume: the same interpreter, script and options
    (--data, the evaluation's), so that it can be pasted as it is."""
    once = ("--resume", "--overwrite", "--from-previous-checkpoint")
    return shlex.join([sys.executable, architecture.script,
                       *(arg for arg in argv if arg not in once), "--resume"])


def main(argv=None, architecture=None):
    """Parse, run, and turn every failure into one line and an exit code: 2 for bad input (found
    before any work is lost), 1 for a failed run, 130 for an interrupt."""
    architecture = architecture or DENSE
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, run_defining = build_parser(architecture)
    args = parser.parse_args(argv)
    if args.model and not args.evaluate_only:
        parser.error("--model goes with --evaluate-only")
    if args.from_previous_checkpoint and not args.resume:
        parser.error("--from-previous-checkpoint goes with --resume")
    if sum((args.resume, args.overwrite, args.evaluate_only)) > 1:
        parser.error("choose one of --resume, --overwrite and --evaluate-only")
    INTERRUPTED.clear()
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)  # a polite kill checkpoints too
    code = None
    try:
        code = fid.exit_code(parser.prog, lambda: run(args, architecture, run_defining,
                                                      command_to_resume(architecture, argv)))
    finally:
        release_results_dirs(refused=code == fid.EXIT_USAGE)
    return code


# ==============================================================================================
# PART 2: PLUMBING (what a model script plugs in, data files, the results directory,
# checkpoints and resume, outputs, and the speed work)
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# What a model script gives the pipeline (conv_vae.py's CONV, this file's DENSE at the end)
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Architecture:
    """What a model script gives the shared pipeline: its networks, options and defaults."""

    script: str  # the program's name in messages and in the resume command
    title: str  # in figures and the summary
    description: str  # --help's first line
    # Each network takes the one-hot label as a second input when classes > 0 (vae.conditioned).
    build_encoder: Callable  # (args, image_shape, classes) -> keras.Model: x -> (z_mean, z_log_var)
    build_decoder: Callable  # (args, image_shape, classes) -> keras.Model: z -> x_hat in [0, 1]
    add_options: Callable  # (argparse group): adds the networks' options (they define a run)
    epochs: int
    batch_size: int
    iw_samples: int  # the default K of the likelihood estimate
    xla: bool  # XLA compilation (XLA_MIN_BATCHES): faster for dense layers, many times slower
    # for CPU convolutions
    batches_per_step: int  # batches per compiled training step (see VAE.train_step)
    image_side_multiple: int = 1  # the decoder rebuilds only image sides that are multiples

    @property
    def results_dir(self):
        return f"results/{Path(self.script).stem}"


# ----------------------------------------------------------------------------------------------
# Data files: MNIST's IDX format and .npz, checked before training
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
        raise UsageError(f"{path}: not an MNIST IDX file (magic number is not "
                         f"{expected_magic:#06x})")
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
                raise UsageError(f"{path}: missing array(s) {', '.join(missing)} "
                                 f"(has {', '.join(npz.files) or 'none'})")
            return {key: npz[key] for key in IDX_FILES}
    except UsageError:
        raise
    except Exception as e:  # zipfile, pickle and value errors all mean "not a usable .npz"
        raise UsageError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None


def check_arrays(arrays, source, num_classes):
    """Shapes, dtypes, label range and counts, so a wrong file fails now rather than mid-run.
    Any image size goes, as long as both splits share it."""
    image_size = arrays["x_train"].shape[1:]
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or x.shape[0] == 0 or x.shape[1:] != image_size:
            expected = "(N, H, W)" if split == "train" else f"(N, {image_size[0]}, {image_size[1]})"
            raise UsageError(f"{source}: x_{split} has shape {x.shape}, expected {expected}")
        if x.dtype != np.uint8:
            raise UsageError(f"{source}: x_{split} has dtype {x.dtype}, "
                             "expected uint8 pixels 0-255")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise UsageError(f"{source}: y_{split} has shape {y.shape}, expected ({x.shape[0]},) "
                             f"to match x_{split}")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes:
            raise UsageError(f"{source}: y_{split} must hold integer labels 0-{num_classes - 1}")


# ----------------------------------------------------------------------------------------------
# The results directory: refuse to clobber a run, hold it for the run's whole life; the
# options and data checked before training
# ----------------------------------------------------------------------------------------------

CHECKPOINT_STATE = "checkpoint.json"
PREVIOUS_CHECKPOINT_STATE = "checkpoint-previous.json"  # one epoch earlier, its model kept
PROGRESS_FRAMES = "progress_frames.npy"
LOCK_FILE = "run.lock"


def check_results_dir(args, run_defining):
    """Lock the directory, prove it writable, and refuse to clobber a run (its model or
    checkpoint: what cannot be recovered) before anything is trained. Figures and metrics without
    a model, such as the examples committed in results/, are replaced. Returns (directory, the
    checkpoint's state or None)."""
    results_dir = Path(args.results_dir)
    created = [folder for folder in (results_dir, *results_dir.parents) if not folder.exists()]
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        probe = results_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"{results_dir}: not writable ({e.strerror})") from None
    lock_results_dir(results_dir, created)
    if args.overwrite:
        for old in [results_dir / "metrics.json", results_dir / CHECKPOINT_STATE,
                    results_dir / PREVIOUS_CHECKPOINT_STATE, results_dir / PROGRESS_FRAMES,
                    *results_dir.glob("checkpoint-epoch*.keras")]:
            old.unlink(missing_ok=True)
        shutil.rmtree(results_dir / "tensorboard", ignore_errors=True)  # its steps would repeat
        return results_dir, None
    state = read_checkpoint(results_dir)
    if args.evaluate_only:
        model_path = Path(args.model) if args.model else results_dir / "model.keras"
        if not model_path.is_file():
            raise UsageError(f"{model_path}: no saved model to evaluate "
                             "(train first, or pass --model PATH)")
        return results_dir, state
    if args.resume:
        if args.from_previous_checkpoint:
            state = read_checkpoint(results_dir, PREVIOUS_CHECKPOINT_STATE)
            if state is None:
                raise UsageError(f"{results_dir}: no checkpoint before the latest")
        check_resume(args, state, results_dir, run_defining)
        return results_dir, state
    if (results_dir / "model.keras").is_file() or state:
        what = ("a finished run" if (results_dir / "model.keras").is_file() else
                f"an interrupted run ({count_of(state['epochs_done'], 'epoch')})")
        raise UsageError(f"{results_dir} holds {what}: use --resume to continue it, "
                         "--evaluate-only to re-evaluate it, or --overwrite to replace it")
    if (results_dir / "metrics.json").is_file():  # e.g. the examples committed in results/
        print(f"note: {results_dir} holds results without a model or checkpoint; this run "
              "replaces them (git checkout restores the repository's examples)")
    return results_dir, None


_held_locks = {}  # results directory -> (open lock file, folders and lock file it created)


def lock_results_dir(results_dir, created=()):
    """An exclusive lock on <results-dir>/run.lock, naming this process: a second run into the
    same directory is refused. The kernel releases it when the process ends, killed or not, so an
    interrupted run's directory is free to resume. created: the folders this run made, which
    release_results_dirs removes again when the run is refused."""
    key = results_dir.resolve()
    if key in _held_locks:
        return
    lock = results_dir / LOCK_FILE
    made = [*([] if lock.exists() else [lock]), *created]  # to remove in this order
    handle = open(lock, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UsageError(f"{results_dir} is in use by a run still going (process {holder}); "
                         "wait for it, or choose another --results-dir") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held_locks[key] = handle, made


def release_results_dirs(refused=False):
    """Let later runs of this process (tests, notebooks) take the directories again. A refused
    run (bad input, found before training) leaves nothing new behind: the lock file and folders
    it made go, unless something else has been written there."""
    while _held_locks:
        handle, made = _held_locks.popitem()[1]
        handle.close()
        for path in made if refused else ():
            try:
                path.rmdir() if path.is_dir() else path.unlink()
            except OSError:  # a folder that holds something else
                break


def check_resume(args, state, results_dir, run_defining):
    """A resume must agree with the checkpointed run on what defines it (run_defining: option ->
    default; an option left at its default takes the run's value)."""
    if state is None:
        raise UsageError(f"{results_dir}: no checkpoint to resume from")
    for key, saved in state["config"].items():
        if key in run_defining:
            given = getattr(args, key)
            if given != saved and given != run_defining[key]:
                raise UsageError(f"--{key.replace('_', '-')} {given} differs from the "
                                 f"checkpointed run's {saved}")
    if state["config"].get("lr_schedule") == "cosine" and args.epochs != state["config"]["epochs"]:
        raise UsageError(f"--epochs {args.epochs}: the run's cosine learning-rate schedule ends at "
                         f"epoch {state['config']['epochs']}; resume with --epochs "
                         f"{state['config']['epochs']}")
    if state["epochs_done"] >= args.epochs and (results_dir / "metrics.json").is_file():
        raise UsageError(f"{results_dir}: already trained "
                         f"{count_of(state['epochs_done'], 'epoch')} and evaluated; pass a larger "
                         "--epochs, or use --evaluate-only")


def settled_options(args, state, run_defining, model=None):
    """The run's options, settled once before anything runs and not changed after: a resumed or
    re-evaluated run takes its checkpoint's run-defining options (an option newer than the
    checkpoint: its default), an evaluated model its likelihood, binarization and dtype policy."""
    options = vars(args).copy()
    if state and (args.resume or args.evaluate_only):
        options.update({key: state["config"].get(key, default)
                        for key, default in run_defining.items()})
    if model is not None:
        options.update(likelihood=model.likelihood, binarize=model.binarize,
                       dtype_policy=model.dtype_policy.name, conditional=bool(model.classes))
    return argparse.Namespace(**options)


def run_config(args):
    """The command-line options of the run, with --data's file name only (no machine paths)."""
    config = {key: value for key, value in vars(args).items()
              if key not in ("resume", "from_previous_checkpoint", "overwrite", "evaluate_only",
                             "model")}
    config["data"] = None if args.data is None else Path(args.data).name
    return config


def check_evaluation_needs(args, architecture, test_shape):
    """What the model and the evaluation will need of the data and the options, checked before
    the first epoch, so that a run that cannot finish is refused instead of failing after
    training."""
    count, height, width = test_shape[:3]
    multiple = architecture.image_side_multiple
    if height % multiple or width % multiple:
        raise UsageError(f"{architecture.script} needs image sides that are multiples of "
                         f"{multiple}, got {height}x{width} images")
    if "classifier" in args.fid and min(height, width) < fid.MIN_CLASSIFIER_IMAGE_SIDE:
        raise UsageError(f"the classifier FID needs images of at least "
                         f"{fid.MIN_CLASSIFIER_IMAGE_SIDE}x{fid.MIN_CLASSIFIER_IMAGE_SIDE} "
                         f"pixels, got {height}x{width}: leave classifier out of --fid")
    needed = fid.fewest_images(args.fid) if args.fid else 2  # 2: pairs to interpolate between
    metrics = f"--fid {','.join(args.fid)}" if args.fid else "the evaluation"
    if count < needed:
        raise UsageError(f"the test set holds {count_of(count, 'image')}; {metrics} needs at "
                         f"least {needed} (--test-size, or a larger x_test)")
    if args.fid and args.fid_samples < needed:
        raise UsageError(f"--fid-samples {args.fid_samples}: {metrics} needs at least {needed} "
                         "prior samples (--fid none skips the FIDs)")


def count_of(number, noun):
    """'1 image', '2 images'."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def prepare_inception(args):
    """Load Inception before training: a bad weights file is an input error; no download is a
    warning."""
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


# ----------------------------------------------------------------------------------------------
# Checkpoints and resume, and the other callbacks of training (one per job)
# ----------------------------------------------------------------------------------------------

def finite(logs):
    return all(math.isfinite(float(value)) for value in logs.values())


class Checkpoints(keras.callbacks.Callback):
    """The run's history across resumes, and a checkpoint of every good epoch.

    The model of epoch N goes to checkpoint-epochN.keras first, then checkpoint.json (the commit
    point) names it, then older model files are removed: a kill at any moment leaves a
    consistent checkpoint behind. The checkpoint of epoch N - 1 stays (checkpoint-previous.json
    and its model), so a damaged latest file costs one epoch, not the run. An epoch whose losses
    are not finite is not saved, and stops the run (diverged_epoch). Keras' BackupAndRestore keeps
    the weights and the optimizer, but not the random generators' states or the history, so a run
    resumed from it would not learn what an unbroken one does.
    """

    def __init__(self, results_dir, config, resumed_from=None):
        super().__init__()
        self.results_dir, self.config = results_dir, config
        self.last_checkpoint = resumed_from
        self.history = copy.deepcopy(resumed_from["history"]) if resumed_from else {}
        self.seconds_per_epoch = list(resumed_from["seconds_per_epoch"]) if resumed_from else []
        self.diverged_epoch = None

    @property
    def epochs_done(self):
        return len(self.seconds_per_epoch)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if not finite(logs):
            self.diverged_epoch = self.epochs_done + 1
            self.model.stop_training = True
            return
        self.seconds_per_epoch.append(time.perf_counter() - self.epoch_start)
        for name, value in logs.items():
            self.history.setdefault(name, []).append(float(value))
        model_file = f"checkpoint-epoch{self.epochs_done}.keras"
        save_model(self.model, self.results_dir / model_file)
        previous, self.last_checkpoint = self.last_checkpoint, {
            "epochs_done": self.epochs_done, "model_file": model_file, "config": self.config,
            "history": copy.deepcopy(self.history),
            "seconds_per_epoch": list(self.seconds_per_epoch),
            "random_states": [variable.numpy().tolist() for variable in random_states(self.model)]}
        if previous:
            write_json(self.results_dir / PREVIOUS_CHECKPOINT_STATE, previous)
        write_json(self.results_dir / CHECKPOINT_STATE, self.last_checkpoint)
        kept = {model_file, previous and previous["model_file"]}
        for old in self.results_dir.glob("checkpoint-epoch*.keras"):
            if old.name not in kept:
                old.unlink()


class ProgressFrames(keras.callbacks.Callback):
    """A frame of training progress per good epoch (the watched images reconstructed, watch_z
    decoded), joining progress_frames.npy before the epoch's checkpoint: a kill may leave one
    frame too many, which a resume drops."""

    def __init__(self, results_dir, watch_images, watch_z, checkpoints, watch_labels=None):
        super().__init__()
        self.results_dir, self.watch_images, self.watch_z = results_dir, watch_images, watch_z
        self.watch_labels = watch_labels  # conditional: (the images', the samples') one-hot
        self.frames = list(read_frames(results_dir)[:checkpoints.epochs_done])

    def on_epoch_end(self, epoch, logs=None):
        if not finite(logs):
            return
        images_labels, samples_labels = self.watch_labels or (None, None)
        z_mean, _ = self.model.encoded(self.watch_images, images_labels)  # eager, milliseconds
        labels = None if images_labels is None else ops.concatenate([images_labels,
                                                                     samples_labels])
        decoded = ops.convert_to_numpy(self.model.decoded(
            ops.concatenate([z_mean, self.watch_z]), labels))
        count = len(self.watch_images)
        self.frames.append(plot_utils.progress_frame(self.watch_images, decoded[:count],
                                                     decoded[count:]))
        fid.atomic_write(self.results_dir / PROGRESS_FRAMES,
                         lambda p: np.save(p, np.stack(self.frames)))


class TensorBoardFrames(keras.callbacks.Callback):
    """Each committed epoch's progress frame as a TensorBoard image."""

    def __init__(self, log_dir, frames):
        super().__init__()
        self.writer, self.frames = tf.summary.create_file_writer(str(log_dir)), frames

    def on_epoch_end(self, epoch, logs=None):
        if finite(logs):
            with self.writer.as_default():
                tf.summary.image("progress", self.frames.frames[-1][None, :, :, None], step=epoch)
            self.writer.flush()


class HistoryCSV(keras.callbacks.Callback):
    """history.csv, rewritten whole after each committed epoch: the loss terms and seconds of
    every epoch, resumed ones included (Keras' CSVLogger appends, so an epoch that a kill made
    repeat would be written twice)."""

    def __init__(self, results_dir, checkpoints):
        super().__init__()
        self.path, self.checkpoints = results_dir / "history.csv", checkpoints

    def on_epoch_end(self, epoch, logs=None):
        if finite(logs):
            write_history_csv(self.path, self.checkpoints.history,
                              self.checkpoints.seconds_per_epoch)


LOSS_CURVES_SHARE = 0.02  # loss_curves.png is redrawn when that costs under 2% of the training time


class LossCurves(keras.callbacks.Callback):
    """loss_curves.png while training: redrawn whenever drawing it costs under LOSS_CURVES_SHARE
    of the time trained since it was last drawn (not after the last epoch: the run draws the
    finished curves right after training)."""

    def __init__(self, results_dir, title, unit, checkpoints):
        super().__init__()
        self.path, self.title, self.unit, self.checkpoints = (results_dir / "loss_curves.png",
                                                              title, unit, checkpoints)
        self.drawn, self.seconds = -math.inf, 0.0

    def on_epoch_end(self, epoch, logs=None):
        last_epoch = epoch + 1 == self.params["epochs"]
        if finite(logs) and not last_epoch and self.seconds <= LOSS_CURVES_SHARE * (
                time.perf_counter() - self.drawn):
            start = time.perf_counter()
            save_figure(plot_utils.loss_curves(self.checkpoints.history, title=self.title,
                                               unit=self.unit), self.path)
            self.drawn = time.perf_counter()
            self.seconds = self.drawn - start


class BatchProgress(keras.callbacks.Callback):
    """Keras' progress bar, counting the batches of the epoch whatever fit's steps are (on the
    grouped data path a step is a group of batches_per_step batches, then the smaller last batch
    alone: make_datasets). Under CI, one line per epoch, as Keras' verbose=2."""

    def __init__(self, num_images, batch_size, batches_per_step):
        super().__init__()
        self.full_batches, remainder = divmod(num_images, batch_size)
        self.total = self.full_batches + (remainder > 0)
        self.full_groups = math.ceil(self.full_batches / batches_per_step)
        self.batches_per_step = batches_per_step
        self.verbose = 2 if os.environ.get("CI") else 1
        self.bar = None

    def on_epoch_begin(self, epoch, logs=None):
        if self.params["epochs"] > 1:
            print(f"Epoch {epoch + 1}/{self.params['epochs']}")
        self.bar = None

    def on_train_batch_end(self, step, logs=None):
        done = (min((step + 1) * self.batches_per_step, self.full_batches)
                if step < self.full_groups else self.total)
        self.show(done, logs)

    def on_epoch_end(self, epoch, logs=None):
        self.show(self.total, logs, finalize=True)

    def show(self, done, logs, finalize=False):
        logs = logs or {}
        if self.bar is None:  # the logs are running values, shown as they come
            self.bar = keras.utils.Progbar(self.total, verbose=self.verbose, unit_name="batch",
                                           stateful_metrics={*logs, *(f"val_{k}" for k in logs)})
        self.bar.update(done, values=list(logs.items()), finalize=finalize)


INTERRUPTED = threading.Event()  # set by interrupt(): Ctrl-C, or a sweep stopping the run


def interrupt(signum, frame):
    """SIGINT and SIGTERM: KeyboardInterrupt, as Python's own handler, and a mark that stays. Raised
    while a weakref callback or a destructor runs, the KeyboardInterrupt is only printed
    ("Exception ignored in ..."): the mark lets InterruptAtBatchEnd raise it again."""
    INTERRUPTED.set()
    raise KeyboardInterrupt


class InterruptAtBatchEnd(keras.callbacks.Callback):
    """Stops training at the end of the batch after an interrupt that Python swallowed; without
    it the run goes on to its last epoch (a sweep's SIGINT to a pruned trial was lost so)."""

    def on_train_batch_end(self, batch, logs=None):
        if INTERRUPTED.is_set():
            raise KeyboardInterrupt


def random_states(model):
    """The state of each random generator in the model (sampling, dropout, binarization). A .keras
    file leaves them out, so the checkpoint keeps them: a resumed run goes on with fresh noise
    instead of replaying the first epoch's."""
    return [variable for variable in model.variables if variable.name == "seed_generator_state"]


def read_frames(results_dir):
    path = results_dir / PROGRESS_FRAMES
    return np.load(path) if path.is_file() else np.zeros((0, 0, 0), np.uint8)


def read_checkpoint(results_dir, name=CHECKPOINT_STATE):
    """The checkpoint's state (epochs, history, timings, random states, its model file's name), or
    None. Its model file is checked where it is loaded (restore_checkpoint): an evaluation needs
    only the history and timings, so a run whose epoch checkpoints were deleted to save disk can
    still be evaluated."""
    path = results_dir / name
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        if "model_file" not in state:
            raise ValueError("it names no model file")
        return state
    except (ValueError, KeyError) as e:
        raise UsageError(f"{path}: unusable checkpoint ({e}); "
                         "use --overwrite to start again") from None


def checkpointed_epochs(results_dir):
    """The epochs of the checkpoint on disk (what a message may promise is saved), 0 if none."""
    try:
        state = read_checkpoint(results_dir)
    except UsageError:
        return 0
    return state["epochs_done"] if state else 0


def restore_checkpoint(results_dir, state):
    """The checkpointed model with its random generators where they were. A damaged file names
    the intact checkpoint of the epoch before, where there is one."""
    try:
        model = load_saved_model(results_dir / state["model_file"])
    except UsageError as damaged:
        earlier = read_checkpoint(results_dir, PREVIOUS_CHECKPOINT_STATE)
        if earlier is None or earlier["model_file"] == state["model_file"]:
            raise
        try:
            load_saved_model(results_dir / earlier["model_file"])
        except UsageError:
            raise damaged from None
        raise UsageError(f"{damaged}; the checkpoint of epoch {earlier['epochs_done']} before it "
                         "is intact: add --from-previous-checkpoint to --resume from there"
                         ) from None
    for variable, value in zip(random_states(model), state.get("random_states", [])):
        variable.assign(value)
    return model


def load_saved_model(path):
    """A saved VAE; a missing, truncated or damaged file is a one-line error that says which."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such model file")
    if not zipfile.is_zipfile(path):
        raise UsageError(f"{path}: unreadable model file (truncated or damaged: not a complete "
                         ".keras archive)")
    try:
        return keras.models.load_model(path)
    except Exception as e:
        raise UsageError(f"{path}: cannot load the model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None


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


def save_progress_animation(results_dir):
    rows = ["test", "decoded", *["prior"] * math.ceil(WATCHED_SAMPLES / WATCHED_IMAGES)]
    images = plot_utils.progress_animation(read_frames(results_dir), row_labels=rows)
    fid.atomic_write(results_dir / "progress.gif", lambda p: images[0].save(
        p, format="GIF", save_all=True, append_images=images[1:], duration=200, loop=0))


def decoded_image_bytes(decoder):
    """float32 bytes of every layer output of the decoder, and the repeated input, for one image:
    an upper bound on what one decoded sample holds in memory."""
    return 4 * (sum(math.prod(layer.output.shape[1:]) for layer in decoder.layers[1:])
                + math.prod(decoder.output.shape[1:]))


LONG_STEP_SECONDS = 30  # a longer evaluation step first says how long, and how to skip it


class ProgressAfterWarmup:
    """A keras.utils.Progbar over `total` items that starts after the first batch (which holds
    the tracing) and, when the whole step will take longer than LONG_STEP_SECONDS, first says how
    long and how to skip it."""

    def __init__(self, total, what, skip_hint, verbose=True):
        self.total, self.what, self.skip_hint, self.verbose = total, what, skip_hint, verbose
        self.start, self.first_done, self.bar = time.perf_counter(), None, None

    def update(self, done):
        if not self.verbose:
            return
        if self.first_done is None and done < self.total:
            self.first_done, self.first_seconds = done, time.perf_counter() - self.start
            return
        if self.bar is None:
            elapsed = time.perf_counter() - self.start
            if self.first_done is not None:
                rate = (elapsed - self.first_seconds) / (done - self.first_done)
                expected = elapsed + rate * (self.total - done)
                if expected > LONG_STEP_SECONDS:
                    print(f"{self.what} of {self.total} images: about {expected:.0f} s "
                          f"({self.skip_hint})")
            print(f"{self.what}:")
            self.bar = keras.utils.Progbar(self.total, unit_name="image")
        self.bar.update(done)


# oneDNN's instruction-set levels, top down: its name (as ONEDNN_MAX_CPU_ISA takes it), the
# /proc/cpuinfo flag that provides it, and the kind metrics.json records (its isa): float32 repeats
# to the last digit within a kind (the two AVX-512 levels differ in bfloat16 kernels only).
ISA_LEVELS = (("AVX512_CORE_AMX", "amx_bf16", "amx"), ("AVX512_CORE_BF16", "avx512_bf16", "avx512"),
              ("AVX512_CORE", "avx512f", "avx512"), ("AVX2", "avx2", "avx2"))


def cpu_isa():
    """(model name, highest level of ISA_LEVELS) of this CPU, as Linux reports it (None below
    AVX2 or elsewhere), lowered to the cap ONEDNN_MAX_CPU_ISA sets: oneDNN then runs the capped
    level's kernels (AVX512_CORE_BF16 runs an AMX CPU's bfloat16 as a CPU without AMX does)."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines()
                      if line.startswith("flags")), []))
    levels = [level for level, _, _ in ISA_LEVELS] + [None]
    found = next((level for level, flag, _ in ISA_LEVELS if flag in flags), None)
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    capped = ("AVX512_CORE_AMX" if "AMX" in cap
              else "AVX512_CORE_BF16" if "BF16" in cap or "FP16" in cap or cap.startswith("AVX10")
              else "AVX512_CORE" if cap.startswith("AVX512") else "AVX2" if cap.startswith("AVX2")
              else None if cap in ("SSE41", "AVX") else found)  # oneDNN ignores other values
    return model, max(found, capped, key=levels.index)


def machine_record():
    """The CPU that made a run: float32 results repeat to the last digit on one kind of CPU and
    differ in late digits across kinds (oneDNN picks other kernels for AVX2, AVX-512 and AMX), so
    every metrics.json says which made it (isa), and at which oneDNN level (bfloat16's kernels)."""
    from tensorflow.python.util import _pywrap_util_port

    model, level = cpu_isa()
    isa = next((kind for name, _, kind in ISA_LEVELS if name == level), "other")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "isa": isa, "onednn_isa": level, "cores": cores,
            "onednn": bool(_pywrap_util_port.IsMklEnabled()),
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or cores,
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads() or cores}


def library_versions():
    import matplotlib
    import scipy

    return {"python": sys.version.split()[0], "tensorflow": tf.__version__,
            "keras": keras.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "matplotlib": matplotlib.__version__}


# ----------------------------------------------------------------------------------------------
# Speed: the grouped data path (batches gathered into groups, one compiled step per group) and
# XLA. --plain trains without them: the same maths, the speed baseline.
# ----------------------------------------------------------------------------------------------

XLA_MIN_BATCHES = 100  # XLA compiles for seconds: a training set of this many batches repays it


def use_xla(architecture, args, num_train):
    """XLA for the training step and the likelihood estimate: where the architecture gains from
    it and the training set is large enough to repay the compilation."""
    return architecture.xla and num_train >= XLA_MIN_BATCHES * args.batch_size


def training_data(args, architecture, x_train, x_test, first_epoch, labels=None):
    """What model.fit takes, and the batches per step: arrays and Keras' batching with --plain,
    else make_datasets' groups of the architecture's batches_per_step. labels: the one-hot labels
    of both sets, for a conditional VAE."""
    if args.plain:
        targets = dict(y=labels[0], validation_data=(x_test, labels[1])) if labels else dict(
            validation_data=(x_test,))
        return dict(x=x_train, batch_size=args.batch_size, shuffle=True, **targets), 1
    if labels:
        x_train, x_test = (x_train, labels[0]), (x_test, labels[1])
    train_data, test_data, groups_per_epoch = make_datasets(
        x_train, x_test, args.batch_size, architecture.batches_per_step, args.seed, first_epoch)
    return dict(x=train_data, steps_per_epoch=groups_per_epoch, validation_data=test_data,
                shuffle=False), architecture.batches_per_step  # the dataset shuffles


def for_each_batch(x, condition, update, batch_rank):
    """update(x, condition) for x, a batch of images (condition: their one-hot labels, or None),
    or for each batch of x, a group of them (one more leading axis): the loop then runs inside the
    compiled step, so that XLA compiles and launches one program per group rather than one per
    batch."""
    if len(x.shape) == batch_rank:
        update(x, condition)
        return

    def update_batch(i, batches_done):
        update(x[i], None if condition is None else condition[i])
        return batches_done + 1

    ops.fori_loop(0, ops.shape(x)[0], update_batch, 0)


def make_datasets(x_train, x_test, batch_size, batches_per_step, seed, first_epoch=0):
    """x_train and x_test: the images, or (images, one-hot labels) for a conditional VAE.

    A fresh seeded permutation each epoch, gathered into groups of batches_per_step batches
    (see VAE.train_step), prefetched while the previous group trains, across epoch ends too (one
    endless stream; fit takes groups_per_epoch from it each epoch). The groups hold exactly one
    epoch's batches, the smaller last one included, so the updates are the same as one batch per
    step. A resumed run starts at its first_epoch's permutation, as an unbroken run would.

    Returns (train, test, groups_per_epoch).
    """
    num_train = len(tf.nest.flatten(x_train)[0])
    num_full, remainder = divmod(num_train, batch_size)
    arrays = tf.nest.map_structure(tf.constant, x_train)

    def permutation(random_seed):
        return tf.random.experimental.stateless_shuffle(tf.range(num_train, dtype=tf.int64),
                                                        seed=tf.stack([random_seed, 0]))

    def groups(order):
        full_batches = tf.reshape(order[:num_full * batch_size], (num_full, batch_size))
        index_groups = tf.data.Dataset.from_tensor_slices(full_batches).batch(batches_per_step)
        if remainder:
            index_groups = index_groups.concatenate(
                tf.data.Dataset.from_tensors(order[None, num_full * batch_size:]))
        return index_groups.map(
            lambda indices: tf.nest.map_structure(lambda a: tf.gather(a, indices), arrays))

    permutations = tf.data.Dataset.random(seed=seed).skip(first_epoch).map(permutation)
    train = permutations.flat_map(groups).prefetch(tf.data.AUTOTUNE)
    test = tf.data.Dataset.from_tensor_slices(x_test).batch(max(batch_size, 1000))
    return (train, test.prefetch(tf.data.AUTOTUNE),
            math.ceil(num_full / batches_per_step) + (remainder > 0))


# ----------------------------------------------------------------------------------------------
# The dense script
# ----------------------------------------------------------------------------------------------

DENSE = Architecture(script="vae.py", title="Dense VAE", description=__doc__.splitlines()[0],
                     build_encoder=dense_encoder, build_decoder=dense_decoder,
                     add_options=add_dense_options, epochs=30, batch_size=64, iw_samples=1000,
                     xla=True, batches_per_step=67)


if __name__ == "__main__":
    sys.exit(main())
