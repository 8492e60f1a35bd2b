"""Variational autoencoder on MNIST (Kingma & Welling, 2014): the dense model and the whole run.

    python vae.py --latent-dim 2 --epochs 30

Part 1 is the experiment, in the order a run goes: the model and its loss (as keras.io's VAE
example), options, data, training, evaluation, main. Part 2 keeps long runs safe and fast: the
results folder and its checkpoints, data files, the training callback, the grouped data path.
conv_vae.py gives its own networks (an `Architecture`) to the same run.
"""

import argparse
import contextlib
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
from pathlib import Path
from typing import Callable

import matplotlib
import numpy as np
import scipy

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

# ---- The model --------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="mnist_vae")
class Sampling(layers.Layer):
    """z ~ q(z|x) by the reparameterisation trick, from a seeded generator: Keras' own noise
    (TensorFlow's "auto_select" is Philox) with Philox asked for by name, which under XLA on a
    CPU is far cheaper than what "auto_select" lowers to."""

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs):
        z_mean, z_log_var = inputs
        seed = ops.cast(self.seed_generator.next(), "int32")
        return reparameterise(z_mean, z_log_var,
                              tf.random.stateless_normal(ops.shape(z_mean), seed, alg="philox"))

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


def reparameterise(z_mean, z_log_var, epsilon):
    """z = mean + exp(log_var / 2) * eps; NumPy arrays (the test ELBO's fixed noise) stay NumPy."""
    exp = np.exp if isinstance(z_log_var, np.ndarray) else ops.exp
    return z_mean + exp(0.5 * z_log_var) * epsilon


def posterior_head(h, latent_dim):
    """(mean, log-variance) of q(z|x). These two layers, the sampling and the decoder's sigmoid
    pixels compute in float32 under any --dtype-policy: in bfloat16 (8 bits of mantissa) a mean
    near 3 moves in steps of 0.016, as large as the posterior's spread, and a pixel of 0.998
    rounds to 1 (binary cross-entropy to its clip)."""
    return (layers.Dense(latent_dim, name="z_mean", dtype="float32")(h),
            layers.Dense(latent_dim, name="z_log_var", dtype="float32")(h))


def dense_layers(h, units, count, activation):
    for _ in range(count):
        h = layers.Dense(units, activation=activation)(h)
    return h


def conditioned(inputs, h, classes):
    """(inputs, h), and for a conditional VAE (classes > 0) the one-hot label as a second input
    set beside h (Sohn, Lee and Yan 2015): the encoder models q(z|x, y), the decoder p(x|z, y)."""
    if not classes:
        return inputs, h
    label = keras.Input((classes,), name="label")
    return [inputs, label], layers.Concatenate()([h, label])


def dense_encoder(args, image_shape, classes=0):
    """784 -> Dense(hidden, relu) x --hidden-layers -> (mean, log-variance), as the original."""
    x = keras.Input(image_shape)
    inputs, h = conditioned(x, layers.Flatten()(x), classes)
    h = dense_layers(h, args.hidden_dim, args.hidden_layers, args.activation)
    return keras.Model(inputs, posterior_head(h, args.latent_dim), name="encoder")


def dense_decoder(args, image_shape, classes=0):
    """latent -> Dense(hidden, relu) x --hidden-layers -> Dense(784, sigmoid), as the original."""
    z = keras.Input((args.latent_dim,))
    inputs, h = conditioned(z, z, classes)
    h = dense_layers(h, args.hidden_dim, args.hidden_layers, args.activation)
    x_hat = layers.Dense(math.prod(image_shape), activation="sigmoid", dtype="float32")(h)
    return keras.Model(inputs, layers.Reshape(image_shape, dtype="float32")(x_hat),
                       name="decoder")


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


# The training loss, per image, term by term: a new term is a new entry (its tracker, history.csv
# column <term>_loss, test metric test_<term> and loss-curve panel follow). The ELBO, and so the
# test ELBO and the likelihood estimate, sums only ELBO_TERMS: a regulariser trains the model
# without changing what its likelihood means. "kl" is weighted by --beta and the warm-up.
LOSS_TERMS = {
    "reconstruction": lambda x, x_hat, z_mean, z_log_var, likelihood:
        reconstruction_error(x, x_hat, likelihood),
    "kl": lambda x, x_hat, z_mean, z_log_var, likelihood: kl_divergence(z_mean, z_log_var),
}
ELBO_TERMS = ("reconstruction", "kl")


def weighted_sum(terms, kl_weight):
    """The training loss from its terms (per image or batch means), the KL weighted."""
    weighted = [kl_weight * value if name == "kl" else value for name, value in terms.items()]
    return sum(weighted[1:], start=weighted[0])


@keras.saving.register_keras_serializable(package="mnist_vae")
class VAE(keras.Model):
    """Encoder -> Sampling -> decoder, trained on reconstruction + kl_weight * KL (LOSS_TERMS).
    With classes > 0 a conditional VAE: each batch comes with one-hot labels for both networks."""

    def __init__(self, encoder, decoder, likelihood="gaussian", binarize="none", seed=None,
                 beta=1.0, kl_warmup_epochs=0, updates_per_epoch=1, classes=0, **kwargs):
        super().__init__(**kwargs)
        self.classes = classes
        self.encoder, self.decoder = encoder, decoder
        self.likelihood, self.binarize, self.seed = likelihood, binarize, seed
        self.beta, self.kl_warmup_epochs = beta, kl_warmup_epochs
        self.updates_per_epoch = updates_per_epoch
        self.sampling = Sampling(seed=seed, dtype="float32")  # see posterior_head
        self.binarize_seed_generator = keras.random.SeedGenerator(
            None if seed is None else seed + 1)
        self.term_trackers = {name: keras.metrics.Mean(name=f"{name}_loss") for name in LOSS_TERMS}
        self.kl_weight_tracker = keras.metrics.Mean(name="kl_weight")

    @property
    def weighted(self):
        return self.beta != 1 or self.kl_warmup_epochs > 0

    @property
    def metrics(self):
        return [*self.term_trackers.values(), *([self.kl_weight_tracker] if self.weighted else [])]

    def kl_weight(self, updates_done):
        """beta, reached linearly over the first --kl-warmup-epochs (epoch e, from 0, weighs
        beta * e / warm-up epochs): a function of the optimizer's update count, which checkpoints
        keep, so a resumed run continues it exactly."""
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

    def loss_terms(self, x, condition, training):
        """{term: its batch mean} of LOSS_TERMS, for one z ~ q(z|x) per image."""
        z_mean, z_log_var = self.encoded(x, condition, training=training)
        x_hat = self.decoded(self.sampling([z_mean, z_log_var]), condition, training=training)
        return {name: ops.mean(term(x, x_hat, z_mean, z_log_var, self.likelihood))
                for name, term in LOSS_TERMS.items()}

    def train_step(self, data):
        """One Adam update per batch. The grouped data path (make_datasets) hands over a group of
        batches (one more leading axis), updated in turn inside this one compiled step. Dynamic
        binarization draws the whole group's pixels at once (per batch they cost more)."""
        x, condition = self.unpack(data)
        if self.binarize == "dynamic":
            x = bernoulli_pixels(x, self.binarize_seed_generator, self.jit_compile)
        if len(x.shape) == len(self.decoder.output.shape):
            self.update(x, condition)
        else:
            def update_batch(i, done):
                self.update(x[i], None if condition is None else condition[i])
                return done + 1
            ops.fori_loop(0, ops.shape(x)[0], update_batch, 0)
        return self.logs()

    def update(self, x, condition):
        kl_weight = self.kl_weight(self.optimizer.iterations)
        with tf.GradientTape() as tape:
            terms = self.loss_terms(x, condition, training=True)
            loss = self.optimizer.scale_loss(weighted_sum(terms, kl_weight))  # mixed_float16
        gradients = tape.gradient(loss, self.trainable_weights)
        self.optimizer.apply(gradients, self.trainable_weights)
        self.track(terms, kl_weight)

    def test_step(self, data):
        """The test loss weighted as the epoch just trained, so train and test curves compare."""
        kl_weight = (self.kl_weight(ops.maximum(self.optimizer.iterations - 1, 0))
                     if self.kl_warmup_epochs else self.beta)
        self.track(self.loss_terms(*self.unpack(data), training=False), kl_weight)
        return self.logs()

    def unpack(self, data):
        """(images, their one-hot labels or None) of what fit hands over."""
        data = data if isinstance(data, tuple) else (data,)
        return data[0], data[1] if self.classes else None

    def track(self, terms, kl_weight):
        for name, value in terms.items():
            self.term_trackers[name].update_state(value)
        if self.weighted:
            self.kl_weight_tracker.update_state(kl_weight)

    def logs(self):
        """The loss, as the weighted sum of the terms' means (a total tracked on its own was
        rearranged by TensorFlow's graph optimizer, and differed in its last bit from it), each
        term's mean and, when it is not 1, the KL weight."""
        means = {name: tracker.result() for name, tracker in self.term_trackers.items()}
        kl_weight = self.kl_weight_tracker.result() if self.weighted else 1.0
        return {"loss": weighted_sum(means, kl_weight),
                **{f"{name}_loss": mean for name, mean in means.items()},
                **({"kl_weight": kl_weight} if self.weighted else {})}

    def get_config(self):
        return {**super().get_config(), "likelihood": self.likelihood, "binarize": self.binarize,
                "encoder": keras.saving.serialize_keras_object(self.encoder),
                "decoder": keras.saving.serialize_keras_object(self.decoder),
                "seed": self.seed, "beta": self.beta, "kl_warmup_epochs": self.kl_warmup_epochs,
                "updates_per_epoch": self.updates_per_epoch, "classes": self.classes}

    @classmethod
    def from_config(cls, config):
        for network in ("encoder", "decoder"):
            config[network] = keras.saving.deserialize_keras_object(config[network])
        return cls(**config)


def bernoulli_pixels(x, seed_generator, xla):
    """Binary pixels, 1 with probability their intensity (to 2^-23), drawn afresh at each call:
    under XLA by ThreeFry (on a CPU much cheaper there than Philox), else by Philox (the only one
    TensorFlow's own kernels have)."""
    seed = ops.cast(seed_generator.next(), "int32")
    uniform = tf.random.stateless_uniform(ops.shape(x), seed, alg="threefry" if xla else "philox")
    return ops.cast(uniform < x, x.dtype)


def log_likelihood_constant(num_pixels, likelihood):
    """What turns the reconstruction error into nats: squared error is -log N(x; x_hat, 1/2) less
    0.5 * log(pi) per pixel (448.7 nats for MNIST); cross-entropy needs nothing."""
    return 0.5 * num_pixels * math.log(math.pi) if likelihood == "gaussian" else 0.0


def loss_unit(likelihood, image_shape):
    """The loss curves' unit: the training loss leaves out the Gaussian decoder's constant."""
    constant = log_likelihood_constant(math.prod(image_shape), likelihood)
    return f"nats per image − {constant:.1f}" if constant else "nats per image"


# ---- Options ------------------------------------------------------------------------------------

TEST_BINARIZATION_SEED = 0  # the binarized test set is the same for every run, so results compare
MANIFOLD_SIZE, CLASS_MANIFOLD_SIZE, MANIFOLD_LIMIT = 30, 10, 4.0  # grids of z over [-4, 4]^2
WATCHED_IMAGES, WATCHED_SAMPLES = 10, 20  # what each progress frame shows
ACTIVATIONS = ("relu", "elu", "gelu", "silu", "tanh")
DTYPE_POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")


def build_parser(architecture):
    """The command line; returns (parser, {option: default} of the options that define a run:
    those of the model, data and architecture groups but --epochs, which extends a run, --plain,
    the same maths at another speed, and fid.MACHINE_OPTIONS)."""
    parser = fid.OneLineErrorParser(prog=architecture.script, description=architecture.description,
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train = parser.add_argument_group("model and training").add_argument
    train("--latent-dim", type=fid.positive_int, default=2, help="size of z")
    train("--epochs", type=fid.positive_int, default=architecture.epochs,
          help="total epochs to train to")
    train("--batch-size", type=fid.positive_int, default=architecture.batch_size,
          help="images per step")
    train("--learning-rate", type=fid.positive_float, default=1e-3, help="Adam learning rate")
    train("--lr-schedule", choices=("constant", "cosine", "burda"), default="constant",
          help="cosine: decay the learning rate to 0 along a half cosine over the run's --epochs "
               "(Loshchilov & Hutter, 2017; --resume cannot extend it); burda: 8 stages of 1, 3, "
               "..., 2187 epochs (3,280 in all), at the rate times 1, 0.72, ..., 0.1 (Burda et al. "
               "2016)")
    train("--adam-beta-1", type=fid.unit_interval, default=0.9,
          help="decay of Adam's first moment (Burda et al. 2016: 0.99)")
    train("--adam-epsilon", type=fid.positive_float, default=1e-7,
          help="added to the root of Adam's second moment (Burda et al. 2016: 1e-4)")
    train("--adam-second-moment-init", type=fid.non_negative_float, default=0.0,
          help="the second moments Adam starts from (Burda et al. 2016: 1, which keeps the first "
               "updates small until they decay)")
    train("--output-bias", choices=("zero", "data-mean"), default="zero",
          help="the decoder's last bias at the start: zero (grey images), or the logit of the "
               "training images' mean, so that training starts from the mean image (Burda et al. "
               "2016; it keeps more latent units active)")
    train("--seed", type=int, default=0, help="seed for weights, shuffling, sampling, evaluation")
    train("--likelihood", choices=("gaussian", "bernoulli"), default="gaussian",
          help="decoder p(x|z): gaussian is the original 784*MSE loss, bernoulli binary "
               "cross-entropy")
    train("--binarize", choices=("none", "dynamic"), default="none",
          help="dynamic: binary pixels ~ Bernoulli(intensity) drawn at each use (test set: once)")
    train("--beta", type=fid.positive_float, default=1.0,
          help="weight of the KL term in the training loss (beta-VAE); the test ELBO and the "
               "likelihood estimate always weigh it 1")
    train("--kl-warmup-epochs", type=fid.non_negative_int, default=0,
          help="raise the KL weight linearly from 0 to --beta over the first N epochs")
    train("--dtype-policy", choices=DTYPE_POLICIES, default="float32",
          help="mixed_*: the VAE's layers compute in 16 bits (variables, loss, ELBO and FID "
               "networks stay float32); mixed_bfloat16 pays for conv_vae.py on CPUs with AMX")
    train("--conditional", action="store_true",
          help="the one-hot label enters both networks, so that samples are of the class asked "
               "for (Sohn et al. 2015); figures and metrics per class follow")
    train("--plain", action="store_true",
          help="plain Keras training (arrays into fit, one batch per step, no XLA, Keras' own "
               "dropout): the speed baseline")
    data = parser.add_argument_group("data").add_argument
    data("--dataset", choices=tuple(DATASETS), default="mnist",
         help="Keras' download without --data; with it, the class names in the figures")
    data("--data", help="an .npz (x_train, y_train, x_test, y_test) or a folder of the four MNIST "
                        "IDX files; default: Keras' download of --dataset")
    data("--train-size", type=fid.positive_int, help="train on the first N images")
    data("--test-size", type=fid.positive_int, help="evaluate on the first N test images")
    evaluation = parser.add_argument_group("evaluation").add_argument
    evaluation("--fid", type=fid_kinds, default="pixel,classifier",
               help="none, all, or a comma-separated subset of pixel (the original's metric), "
                    "classifier (a digit classifier's features: MNIST's is committed, others are "
                    "trained once and cached) and inception (the standard FID; slow on a CPU)")
    evaluation("--fid-samples", type=fid.positive_int, default=10000,
               help="prior samples compared with the test images")
    evaluation("--inception-weights", default="imagenet",
               help="'imagenet' (Keras download) or an InceptionV3 weights file")
    evaluation("--fid-batch-size", type=fid.positive_int, default=50,
               help="images per Inception batch")
    evaluation("--iw-samples", type=fid.non_negative_int, default=architecture.iw_samples,
               help="K of the importance-weighted log-likelihood estimate; 0 skips it")
    runs = parser.add_argument_group("outputs and long runs").add_argument
    runs("--results-dir", default=f"results/{Path(architecture.script).stem}",
         help="where every output and checkpoint goes; a run there with a model or checkpoint "
              "needs --resume, --evaluate-only or --overwrite (the committed examples have none)")
    runs("--tensorboard", action="store_true",
         help="log loss terms and progress frames to <results-dir>/tensorboard/")
    runs("--resume", action="store_true", help="continue the run in --results-dir to --epochs")
    runs("--overwrite", action="store_true", help="replace a run already in --results-dir")
    runs("--evaluate-only", action="store_true",
         help="figures and metrics again from the saved model, without training")
    runs("--model", help="with --evaluate-only: a .keras file, not <results-dir>/model.keras")
    networks = parser.add_argument_group("architecture")
    networks.add_argument("--activation", choices=ACTIVATIONS, default="relu",
                          help="of the hidden layers")
    architecture.add_options(networks)
    defining = [action.dest for action in parser._actions  # argparse keeps no public list
                if action.container.title in ("model and training", "data", "architecture")
                and action.dest not in ("epochs", "plain", *fid.MACHINE_OPTIONS)]
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


# ---- Data ---------------------------------------------------------------------------------------

DATASETS = {  # --dataset: Keras' download, the name in figures, the class names
    "mnist": (keras.datasets.mnist, "MNIST", tuple("0123456789")),
    "fashion_mnist": (keras.datasets.fashion_mnist, "Fashion-MNIST", (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
        "Ankle boot")),
}


def load_dataset(path=None, dataset="mnist"):
    """(x_train, y_train, x_test, y_test): uint8 images and integer labels from an .npz, a folder
    of IDX files or Keras' download, checked (check_arrays) before any training."""
    module, name, class_names = DATASETS[dataset]
    if path is None:
        try:
            (x_train, y_train), (x_test, y_test) = module.load_data()
        except Exception as e:
            raise UsageError(f"cannot download {name} ({type(e).__name__}: {e}); "
                             "pass --data PATH to a local copy") from None
        arrays, source = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test), name
    else:
        source = Path(path)
        if source.is_dir():
            arrays = read_idx_folder(source)
        elif source.is_file():
            arrays = read_npz(source)
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
    return np.arange(count) % classes  # 0, 1, ..., classes - 1, 0, 1, ...: what samples ask for


def binarize_once(x, seed):
    """A Bernoulli(intensity) draw of every pixel: the fixed binarized test set."""
    return (np.random.default_rng(seed).random(x.shape, dtype=np.float32) < x).astype(np.float32)


# ---- Training -----------------------------------------------------------------------------------

def build_model(args, architecture, image_shape, updates_per_epoch=1):
    """A new VAE whose layers compute in --dtype-policy (Keras' global policy while they are made;
    each keeps its own, and model.keras saves it), then float32 again for what is built later."""
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


def start_at_data_mean(decoder, x_train):
    """--output-bias data-mean: the decoder's last bias at the logit of the training images' mean
    (each pixel's, or each channel's for a convolution), clipped to [0.001, 0.999] as in Burda et
    al.'s code, so that the first updates model digits rather than the mean image."""
    bias = [layer.bias for layer in decoder.layers if getattr(layer, "bias", None) is not None][-1]
    mean = np.clip(x_train.reshape(-1, bias.shape[0]).mean(axis=0), 0.001, 0.999)
    bias.assign(np.log(mean / (1.0 - mean)))


def compile_model(model, args, xla):
    learning_rate = args.learning_rate
    if args.lr_schedule == "cosine":  # a function of the update count: checkpoints keep both
        learning_rate = keras.optimizers.schedules.CosineDecay(
            learning_rate, args.epochs * model.updates_per_epoch)
    elif args.lr_schedule == "burda":  # stage i (from 0) of 3^i epochs at 10^(-i/7), as rounded
        # in Burda et al.'s code; a boundary's own step keeps the rate before it
        learning_rate = keras.optimizers.schedules.PiecewiseConstantDecay(
            [(3 ** (i + 1) - 1) // 2 * model.updates_per_epoch - 1 for i in range(7)],
            [learning_rate * round(10 ** (1 - i / 7), 1) / 10 for i in range(8)])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate, beta_1=args.adam_beta_1,
                                                  epsilon=args.adam_epsilon), jit_compile=xla)
    # Adam's variables now: made inside the first traced step, they would trace it twice.
    model.optimizer.build(model.trainable_variables)
    for variable in model.optimizer.variables:
        if variable.path.endswith("_velocity"):  # the second moments
            variable.assign(ops.full_like(variable, args.adam_second_moment_init))


def train(model, args, architecture, title, results_dir, x_train, x_test, state, resume_command,
          labels=None):
    """model.fit from the checkpointed epoch; returns the RunCallback (history, timings).
    labels: the one-hot labels of both sets, for a conditional VAE."""
    watch_z = np.random.default_rng(args.seed + 2).standard_normal(
        (WATCHED_SAMPLES, args.latent_dim)).astype(np.float32)
    watch_labels = labels and (labels[1][:WATCHED_IMAGES], one_hot(
        balanced_labels(WATCHED_SAMPLES, model.classes), model.classes))
    run = RunCallback(results_dir, run_config(args), state, title,
                      loss_unit(args.likelihood, x_test.shape[1:]),
                      x_test[:WATCHED_IMAGES], watch_z, watch_labels, args.tensorboard)
    callbacks = [keras.callbacks.TerminateOnNaN(), run]
    if args.tensorboard:  # after the checkpoint: an epoch is logged once it is committed
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(results_dir / "tensorboard"),
                                                     write_graph=False))
    (results_dir / "metrics.json").unlink(missing_ok=True)  # of the model this run replaces
    fit_data = training_data(args, architecture, x_train, x_test, run.epochs_done, labels)
    try:
        model.fit(**fit_data, epochs=args.epochs, initial_epoch=run.epochs_done,
                  callbacks=callbacks, verbose=1 if sys.stdout.isatty() else 2)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{count_of(run.saved_epochs, 'complete epoch')} "
                                f"checkpointed in {results_dir}.\nresume with: {resume_command}"
                                ) from None
    except OSError as e:  # the disk filled up while writing a checkpoint, say
        saved = count_of(run.saved_epochs, "epoch")
        raise RunFailed(f"cannot write a checkpoint in {results_dir} ({e.strerror or e}); the last "
                        f"complete one ({saved}) is intact. Free space, then: {resume_command}"
                        ) from None
    if run.diverged_epoch:
        kept = (f"the last good checkpoint ({count_of(run.saved_epochs, 'epoch')}) is kept in "
                f"{results_dir}" if run.saved_epochs else "no epoch completed, so there is no "
                "checkpoint")
        raise RunFailed(f"the loss became NaN or infinite in epoch {run.diverged_epoch}; "
                        f"training stopped and {kept}. Try a smaller --learning-rate.")
    return run


# ---- Evaluation ---------------------------------------------------------------------------------

def encode(model, x, condition=None):
    """Posterior means and log-variances of all images."""
    return fid.in_batches(model.encoder, x if condition is None else [x, condition])


def decode(model, z, condition=None):
    return fid.in_batches(model.decoder, z if condition is None else [z, condition])


def evaluate_elbo(model, x, seed, posterior=None, condition=None):
    """One z ~ q(z|x) per test image from fixed noise. Returns the reconstructions (the original's
    `vae.predict`) and {term: per-image values} in nats, the reconstruction with its constant.
    posterior: x's (means, log-variances) where the caller has them."""
    z_mean, z_log_var = posterior or encode(model, x, condition)
    epsilon = np.random.default_rng(seed).standard_normal(z_mean.shape).astype(np.float32)
    reconstructions = decode(model, reparameterise(z_mean, z_log_var, epsilon), condition)
    terms = {name: ops.convert_to_numpy(term(x, reconstructions, z_mean, z_log_var,
                                             model.likelihood))
             for name, term in LOSS_TERMS.items()}
    terms["reconstruction"] += log_likelihood_constant(math.prod(x.shape[1:]), model.likelihood)
    return reconstructions, terms


ACTIVE_UNIT_THRESHOLD = 0.01  # Burda, Grosse and Salakhutdinov (2016), section 5.2


def latent_usage(z_mean, z_log_var):
    """Active units: dimensions whose posterior mean varies over the test set,
    Var_x(E_q(z|x)[z_d]) > 0.01 (Burda et al. 2016); and each dimension's KL, nats per image (a
    collapsed dimension's is near 0)."""
    activity = np.var(z_mean.astype(np.float64), axis=0)
    kl = ops.convert_to_numpy(kl_divergence(z_mean[..., None], z_log_var[..., None]))
    return {"active_units": int(np.sum(activity > ACTIVE_UNIT_THRESHOLD)),
            "kl_per_dimension": [float(value) for value in np.mean(kl, axis=0)]}


def standard_normal_log_density(x):
    return -0.5 * (math.log(2 * math.pi) + ops.square(x))


IW_DECODER_MEMORY = 128 * 2**20  # bytes of decoder activations per call of the estimate


def importance_weighted_log_likelihood(model, x, num_samples, seed, posterior=None, xla=True,
                                       images_per_batch=100, samples_per_chunk=None, verbose=True,
                                       decoder_memory=IW_DECODER_MEMORY, condition=None):
    """log p(x) ~ log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x) (Burda et al. 2016), per image
    (log p(x|y) for a conditional VAE, condition the one-hot labels).

    Images go in batches and their K samples in chunks, combined by log-sum-exp; a chunk whose
    decodes would hold more than decoder_memory bytes is decoded a few images at a time. The
    noise is drawn per chunk either way, so the estimate does not depend on the memory limit.
    """
    constant = log_likelihood_constant(math.prod(x.shape[1:]), model.likelihood)
    samples_per_chunk = samples_per_chunk or max(1, min(num_samples, 20000 // images_per_batch))
    decoder = model.decoder  # bytes of every layer's output for one decode: a bound on its memory
    decode_bytes = 4 * (sum(math.prod(layer.output.shape[1:]) for layer in decoder.layers[1:])
                        + math.prod(decoder.output.shape[1:]))
    decodes_per_call = max(1, decoder_memory // decode_bytes)

    @tf.function(jit_compile=xla)
    def log_weights(x_batch, z_mean, z_log_var, epsilon, *condition):
        z = reparameterise(z_mean[:, None, :], z_log_var[:, None, :], epsilon)
        log_q = ops.sum(standard_normal_log_density(epsilon) - 0.5 * z_log_var[:, None, :], axis=-1)
        log_prior = ops.sum(standard_normal_log_density(z), axis=-1)
        batch, chunk, latent = ops.shape(epsilon)
        x_hat = model.decoded(ops.reshape(z, (batch * chunk, latent)),
                              ops.repeat(condition[0], chunk, axis=0) if condition else None)
        log_px = -(reconstruction_error(ops.repeat(x_batch, chunk, axis=0), x_hat,
                                        model.likelihood) + constant)
        return ops.reshape(log_px, (batch, chunk)) + log_prior - log_q

    rng = np.random.default_rng(seed)
    z_mean, z_log_var = posterior or encode(model, x, condition)
    estimates = np.empty(len(x))
    progress = fid.progress_bar(len(x), verbose=verbose)
    for begin in range(0, len(x), images_per_batch):
        end = min(begin + images_per_batch, len(x))
        chunks = []
        for done in range(0, num_samples, samples_per_chunk):
            size = min(samples_per_chunk, num_samples - done)
            epsilon = rng.standard_normal((end - begin, size, z_mean.shape[1])).astype(np.float32)
            calls = math.ceil((end - begin) / max(1, decodes_per_call // size))
            step = math.ceil((end - begin) / calls)  # even calls: 50 + 50, not 99 + 1 (a retrace)
            bounds = [*range(begin, end, step), end]
            chunks.append(ops.concatenate([
                log_weights(x[i:j], z_mean[i:j], z_log_var[i:j], epsilon[i - begin:j - begin],
                            *([] if condition is None else [condition[i:j]]))
                for i, j in zip(bounds, bounds[1:])], axis=0))
        all_weights = ops.concatenate(chunks, axis=1)
        estimates[begin:end] = (ops.convert_to_numpy(ops.logsumexp(all_weights, axis=1))
                                - math.log(num_samples))
        progress.update(end)
    return estimates


def interpolate(model, x, labels, z_mean, class_names, steps=10):
    """Straight latent paths between posterior means, decoded at `steps` points: from the first
    test image of each class to the first of the class 3 after it (with a single class, between
    consecutive test images); a conditional VAE's one-hot label moves along the same path.
    Returns (start images, decodings (pairs, steps, ...), end images, row labels)."""
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
        start_labels, end_labels = (one_hot(labels[i], model.classes)[:, None] for i in (starts, ends))
        condition = ((1 - t) * start_labels + t * end_labels).reshape(-1, model.classes)
    decoded = decode(model, paths.reshape(-1, z_mean.shape[1]), condition).reshape(
        len(pairs), steps, *x.shape[1:])
    names = [f"{class_names[labels[a]]} \N{RIGHTWARDS ARROW} {class_names[labels[b]]}"
             for a, b in pairs]
    return x[starts], decoded, x[ends], names


def fids(args, test_images, reconstructions, samples, dataset, inception, inception_error):
    """Each FID of --fid, of the reconstructions and of the prior samples against the test images;
    in the classifier's and Inception's features also KID and precision / recall / density /
    coverage, which tell samples unlike the data from parts of the data no sample reaches.
    The classifier is that of the whole training split (dataset: the four arrays), whatever
    --train-size, so every run on the same data shares one (MNIST's is committed)."""
    results, networks, seconds = {}, {"pixel": None} if "pixel" in args.fid else {}, {}
    start = time.perf_counter()
    if "classifier" in args.fid:
        networks["classifier"] = fid.load_or_train_classifier(*dataset)
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
                       verbose=kind == "inception")
        cache_dir = None if kind == "pixel" else fid.default_cache_dir()
        real = fid.compute_features(test_images, kind, **options, cache_dir=cache_dir)
        real_statistics = fid.statistics_from_features(real, kind)
        for name, images in (("recon", reconstructions), ("samples", samples)):
            fake = fid.compute_features(images, kind, **options)
            results[f"fid_{kind}_{name}"] = fid.frechet_distance(
                real_statistics, fid.statistics_from_features(fake, kind))
            if kind == "pixel":
                continue
            kid, kid_std = fid.kernel_distance(real, fake)
            results.update({f"kid_{kind}_{name}": kid, f"kid_{kind}_{name}_std": kid_std})
            results.update({f"{metric}_{kind}_{name}": value for metric, value in
                            fid.precision_recall_density_coverage(real, fake).items()})
        seconds[kind] = time.perf_counter() - start
    return {**results, "fid_seconds": {step: round(value, 2) for step, value in seconds.items()}}


def conditional_metrics(dataset, test_images, y_test, samples, sample_labels):
    """Whether a conditional VAE's samples are of the class asked for: label_accuracy (the share
    the data's own classifier assigns to their class), and per class the FID and KID in its
    features of the class's test images against the samples asked for it (None: too few)."""
    classifier = fid.load_or_train_classifier(*dataset, verbose=False)
    real = fid.compute_features(test_images, "classifier", classifier, verbose=False,
                                cache_dir=fid.default_cache_dir())  # fids() cached them
    fake = fid.compute_features(samples, "classifier", classifier, verbose=False)
    per_class = {"fid_classifier_per_class": [], "kid_classifier_per_class": []}
    for label in range(int(sample_labels.max()) + 1):
        a, b = real[y_test == label], fake[sample_labels == label]
        enough = min(len(a), len(b)) >= 2
        per_class["fid_classifier_per_class"].append(fid.frechet_distance(
            fid.statistics_from_features(a, "classifier"),
            fid.statistics_from_features(b, "classifier")) if enough else None)
        per_class["kid_classifier_per_class"].append(
            fid.kernel_distance(a, b)[0] if enough else None)
    return {"label_accuracy": fid.classifier_accuracy(classifier, samples, sample_labels),
            **per_class}


def evaluate(model, args, title, results_dir, x_test, y_test, dataset, inception, inception_error,
             xla=True):
    """Figures, ELBO, active units, importance-weighted log-likelihood and FIDs; deterministic
    for a seed."""
    start = time.perf_counter()
    test_images = (binarize_once(x_test, TEST_BINARIZATION_SEED) if args.binarize == "dynamic"
                   else x_test)
    classes = model.classes
    test_labels = one_hot(y_test, classes) if classes else None
    posterior = encode(model, test_images, test_labels)
    reconstructions, terms = evaluate_elbo(model, test_images, args.seed, posterior, test_labels)
    metrics = {"test_elbo": float(np.mean(-sum(terms[name] for name in ELBO_TERMS))),
               **{f"test_{name}": float(np.mean(values)) for name, values in terms.items()},
               **latent_usage(*posterior)}
    class_names = DATASETS[args.dataset][2]
    named = None if args.dataset == "mnist" else class_names  # digits label themselves
    z_mean = posterior[0]
    figures = {
        "reconstruction_images": plot_utils.reconstructions(
            test_images[:100], reconstructions[:100], title=title,
            items="digits" if named is None else "images"),
        "latent_space_representation": plot_utils.latent_space(z_mean, y_test, title=title,
                                                                class_names=named),
        "interpolation": plot_utils.interpolation(
            *interpolate(model, test_images, y_test, z_mean, class_names), title=title,
            conditional=bool(classes))}
    if z_mean.shape[1] == 2:
        size = CLASS_MANIFOLD_SIZE if classes else MANIFOLD_SIZE
        grid = np.linspace(-MANIFOLD_LIMIT, MANIFOLD_LIMIT, size, dtype=np.float32)
        z_grid = np.stack(np.meshgrid(grid, grid[::-1]), axis=-1).reshape(-1, 2)  # row 0: top
        cell_shape = (size, size, *x_test.shape[1:3])
        figures["manifold"] = (plot_utils.manifold(
            decode(model, z_grid).reshape(cell_shape), grid, title=title) if not classes else
            plot_utils.class_manifolds(np.stack([
                decode(model, z_grid, one_hot(np.full(len(z_grid), label), classes)).reshape(
                    cell_shape) for label in range(classes)]), grid, class_names, title=title))
    else:
        print(f"note: latent dimension {z_mean.shape[1]}: the 2-D manifold figure is skipped")

    count = args.fid_samples if args.fid else 100  # the figure shows the first 100 either way
    z_prior = np.random.default_rng(args.seed + 1).standard_normal(
        (count, z_mean.shape[1])).astype(np.float32)
    sample_labels = balanced_labels(count, classes) if classes else None
    samples = decode(model, z_prior, None if sample_labels is None
                     else one_hot(sample_labels, classes))
    figures["samples"] = plot_utils.samples(samples[:100], title=title)
    if classes:  # samples by class; each class's first test image decoded with every label
        shown = min(WATCHED_IMAGES, count // classes)
        by_class = samples[:shown * classes].reshape(shown, classes, *samples.shape[1:])
        figures["conditional_samples"] = plot_utils.conditional_samples(
            by_class.swapaxes(0, 1), class_names, title=title)
        firsts = [np.flatnonzero(y_test == label)[0] for label in np.unique(y_test)]
        rows = np.array(firsts if len(firsts) > 1 else range(min(WATCHED_IMAGES, len(y_test))))
        decoded = decode(model, np.repeat(z_mean[rows], classes, axis=0),
                         one_hot(np.tile(np.arange(classes), len(rows)), classes))
        figures["analogies"] = plot_utils.analogies(
            test_images[rows], decoded.reshape(len(rows), classes, *test_images.shape[1:]),
            class_names, title=title)
    for name, figure in figures.items():
        save_figure(figure, results_dir / f"{name}.png")

    if args.iw_samples:
        iw_start = time.perf_counter()
        print(f"importance-weighted log-likelihood (K={args.iw_samples}; --iw-samples 0 skips it):")
        log_likelihood = importance_weighted_log_likelihood(
            model, test_images, args.iw_samples, args.seed, posterior, xla=xla,
            condition=test_labels)
        metrics.update(test_log_likelihood_iw=float(np.mean(log_likelihood)),
                       iw_samples=args.iw_samples,
                       iw_seconds=round(time.perf_counter() - iw_start, 2))
    metrics.update(fids(args, test_images, reconstructions, samples, dataset, inception,
                        inception_error))
    if classes and "classifier" in args.fid:
        metrics.update(conditional_metrics(dataset, test_images, y_test, samples, sample_labels))
    metrics["evaluation_seconds"] = round(time.perf_counter() - start, 2)
    return metrics


def print_summary(title, metrics, results_dir):
    """The run's numbers with their units: fid.RUN_METRICS, each loss term's test value, the
    per-dimension and per-class lists, the time per epoch."""
    print(f"\n{title}: {count_of(metrics['epochs'], 'epoch')}, results in {results_dir}/")
    shown = {key: (metric.digits, metric.unit) for key, metric in fid.RUN_METRICS.items()}
    shown.update({f"test_{name}": (3, "nats per image") for name in LOSS_TERMS},
                 kl_per_dimension=(3, "nats per image"), fid_classifier_per_class=(1, ""),
                 kid_classifier_per_class=(2, ""))
    for key, (digits, unit) in shown.items():
        if key in metrics:
            values = metrics[key] if isinstance(metrics[key], list) else [metrics[key]]
            text = ", ".join("null" if value is None else f"{value:.{digits}f}" for value in values)
            if key.startswith("kid_") and f"{key}_std" in metrics:
                text = fid.kid_text(metrics[key], metrics[f"{key}_std"])
            print(f"  {key:30s} {text:>10s}  {unit}".rstrip())
    if metrics.get("seconds_per_epoch"):
        print(f"  {'median seconds per epoch':30s} {np.median(metrics['seconds_per_epoch']):10.2f}")


# ---- The run, and main --------------------------------------------------------------------------

def run(args, architecture, run_defining, resume_command):
    """Check everything, then train (or resume) and evaluate into --results-dir."""
    results_dir = Path(args.results_dir)
    state = None if args.overwrite else read_checkpoint(results_dir)
    model = (fid.load_model(args.model or results_dir / "model.keras") if args.evaluate_only
             and (args.model or (results_dir / "model.keras").is_file()) else None)
    settled = settled_options(args, state, run_defining, model)
    dataset = load_dataset(settled.data, settled.dataset)
    check_results_dir(args, results_dir, state, run_defining)
    args = settled
    title = architecture.title
    figure_title = title if args.dataset == "mnist" else f"{title} on {DATASETS[args.dataset][1]}"
    x_train, y_train, x_test, y_test = dataset
    x_train, y_train = to_float_images(x_train[:args.train_size]), y_train[:args.train_size]
    x_test, y_test = to_float_images(x_test[:args.test_size]), y_test[:args.test_size]
    classes = len(DATASETS[args.dataset][2])
    labels = (one_hot(y_train, classes), one_hot(y_test, classes)) if args.conditional else None
    check_evaluation_needs(args, architecture, x_test.shape)
    inception, inception_error = prepare_inception(args)
    xla = architecture.xla and len(x_train) >= XLA_MIN_BATCHES * args.batch_size

    with results_dir_held(results_dir, args.overwrite):
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
                model((x_train[:1], labels[0][:1]) if labels else x_train[:1])  # weights, so that
                compile_model(model, args, xla and not args.plain)  # checkpoints hold them
                if args.output_bias == "data-mean":
                    start_at_data_mean(model.decoder, x_train)
            trained = train(model, args, architecture, figure_title, results_dir, x_train, x_test,
                            state, resume_command, labels)
            history, seconds_per_epoch = trained.history, trained.seconds_per_epoch
            save_model(model, results_dir / "model.keras")
        if (results_dir / PROGRESS_FRAMES).is_file() and seconds_per_epoch:  # --evaluate-only too
            save_progress_animation(results_dir, len(seconds_per_epoch))
        if history:
            save_figure(plot_utils.loss_curves(history, title=figure_title,
                                               unit=loss_unit(args.likelihood, x_test.shape[1:])),
                        results_dir / "loss_curves.png")
        metrics = {"model": title, "epochs": len(seconds_per_epoch), "config": run_config(args),
                   "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                           / 1024),
                   "versions": {"python": platform.python_version(), **{
                       module.__name__: module.__version__
                       for module in (tf, keras, np, scipy, matplotlib)}},
                   "machine": machine_record(),
                   "seconds_per_epoch": [round(s, 3) for s in seconds_per_epoch]}
        for name in (name for name in history or {} if name.endswith("loss")
                     and not name.startswith("val_")):
            metrics[f"final_train_{name}"] = history[name][-1]
            metrics[f"final_test_{name}"] = history[f"val_{name}"][-1]
        metrics.update(evaluate(model, args, figure_title, results_dir, x_test, y_test, dataset,
                                inception, inception_error, xla=xla))
        write_json(results_dir / "metrics.json", metrics)
    print_summary(title, metrics, results_dir)


def main(argv=None, architecture=None):
    """Parse, run, and turn every failure into one line and an exit code: 2 for bad input (found
    before any work is lost), 1 for a failed run, 130 for an interrupt."""
    architecture = architecture or DENSE
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, run_defining = build_parser(architecture)
    args = parser.parse_args(argv)
    if args.model and not args.evaluate_only:
        parser.error("--model goes with --evaluate-only")
    if sum((args.resume, args.overwrite, args.evaluate_only)) > 1:
        parser.error("choose one of --resume, --overwrite and --evaluate-only")
    INTERRUPTED.clear()
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)  # a polite kill checkpoints too
    resume_command = shlex.join([sys.executable, architecture.script,
                                 *(arg for arg in argv if arg not in ("--resume", "--overwrite")),
                                 "--resume"])
    return fid.exit_code(parser.prog, lambda: run(args, architecture, run_defining,
                                                  resume_command))


# ==============================================================================================
# PART 2: KEEPING LONG RUNS SAFE AND FAST
# ==============================================================================================

@dataclasses.dataclass(frozen=True)
class Architecture:
    """What a model script gives the run: its name (in messages and the resume command), title
    and --help line; its networks, (args, image_shape, classes) -> keras.Model, x -> (z_mean,
    z_log_var) and z -> x_hat in [0, 1], and their options; its defaults; whether XLA and grouped
    batches pay (for dense layers; CPU convolutions under XLA are many times slower); the image
    sides its decoder can rebuild (multiples of image_side_multiple)."""

    script: str
    title: str
    description: str
    build_encoder: Callable
    build_decoder: Callable
    add_options: Callable
    epochs: int
    batch_size: int
    iw_samples: int
    xla: bool
    image_side_multiple: int = 1


# ---- The results folder: refuse to clobber a run, check what the run needs --------------------

CHECKPOINT_STATE = "checkpoint.json"
PROGRESS_FRAMES = "progress_frames.npy"


def check_results_dir(args, results_dir, state, run_defining):
    """Refuse, before anything is trained, to clobber a run (its model or checkpoint: what cannot
    be recovered). Figures and metrics without a model, such as the committed examples, are
    replaced."""
    finished = (results_dir / "model.keras").is_file()
    if args.evaluate_only:
        if not Path(args.model or results_dir / "model.keras").is_file():
            raise UsageError(f"{args.model or results_dir / 'model.keras'}: no saved model to "
                             "evaluate (train first, or pass --model PATH)")
    elif args.resume:
        check_resume(args, state, results_dir, run_defining)
    elif not args.overwrite and (finished or state):
        what = ("a finished run" if finished else
                f"an interrupted run ({count_of(state['epochs_done'], 'epoch')})")
        raise UsageError(f"{results_dir} holds {what}: use --resume to continue it, "
                         "--evaluate-only to re-evaluate it, or --overwrite to replace it")
    elif (results_dir / "metrics.json").is_file():
        print(f"note: {results_dir} holds results without a model or checkpoint; this run "
              "replaces them (git checkout restores the repository's examples)")


def check_resume(args, state, results_dir, run_defining):
    """A resume agrees with the checkpointed run on what defines it (an option left at its
    default takes the run's value)."""
    if state is None:
        raise UsageError(f"{results_dir}: no checkpoint to resume from")
    for key, saved in state["config"].items():
        given = getattr(args, key, None)
        if key in run_defining and given not in (saved, run_defining[key]):
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


@contextlib.contextmanager
def results_dir_held(results_dir, overwrite):
    """The folder made and held through <results-dir>/run.lock while the run goes: a second run
    into it is refused. The kernel lets the lock go with the process, killed or not."""
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        lock = open(results_dir / "run.lock", "w")
    except OSError as e:
        raise UsageError(f"{results_dir}: not writable ({e.strerror})") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{results_dir} is in use by a run still going; wait for it, or "
                             "choose another --results-dir") from None
        if overwrite:
            for old in [results_dir / "metrics.json", results_dir / PROGRESS_FRAMES,
                        *results_dir.glob("checkpoint*")]:
                old.unlink(missing_ok=True)
            shutil.rmtree(results_dir / "tensorboard", ignore_errors=True)  # its steps would repeat
        try:
            yield
        finally:
            (results_dir / "run.lock").unlink(missing_ok=True)


def settled_options(args, state, run_defining, model=None):
    """The run's options, settled before anything runs: a resumed or re-evaluated run takes its
    checkpoint's run-defining options (one newer than the checkpoint: its default), an evaluated
    model its likelihood, binarization, dtype policy and conditioning."""
    options = vars(args).copy()
    if state and (args.resume or args.evaluate_only):
        options.update({key: state["config"].get(key, default)
                        for key, default in run_defining.items()})
    if model is not None:
        options.update(likelihood=model.likelihood, binarize=model.binarize,
                       dtype_policy=model.dtype_policy.name, conditional=bool(model.classes))
    return argparse.Namespace(**options)


def run_config(args):
    """The run's options, --data by its file name only (no machine paths)."""
    config = {key: value for key, value in vars(args).items()
              if key not in fid.INVOCATION_OPTIONS}
    config["data"] = None if args.data is None else Path(args.data).name
    return config


def check_evaluation_needs(args, architecture, test_shape):
    """What the model and the evaluation need of the data and options, checked before the first
    epoch: a run that cannot finish is refused rather than failing after training."""
    count, height, width = test_shape[:3]
    multiple = architecture.image_side_multiple
    if height % multiple or width % multiple:
        raise UsageError(f"{architecture.script} needs image sides that are multiples of "
                         f"{multiple}, got {height}x{width} images")
    if "classifier" in args.fid and min(height, width) < fid.MIN_CLASSIFIER_IMAGE_SIDE:
        raise UsageError(f"the classifier FID needs images of at least "
                         f"{fid.MIN_CLASSIFIER_IMAGE_SIDE}x{fid.MIN_CLASSIFIER_IMAGE_SIDE} "
                         f"pixels, got {height}x{width}: leave classifier out of --fid")
    needed = fid.fewest_images(args.fid) if args.fid else 2  # 2: a pair to interpolate between
    metrics = f"--fid {','.join(args.fid)}" if args.fid else "the evaluation"
    if count < needed:
        raise UsageError(f"the test set holds {count_of(count, 'image')}; {metrics} needs at "
                         f"least {needed} (--test-size, or a larger x_test)")
    if args.fid and args.fid_samples < needed:
        raise UsageError(f"--fid-samples {args.fid_samples}: {metrics} needs at least {needed} "
                         "prior samples (--fid none skips the FIDs)")


def prepare_inception(args):
    """Inception, loaded before training: a bad weights file is an input error, no download a
    warning (its FIDs are null)."""
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


def count_of(number, noun):
    return f"{number} {noun}{'' if number == 1 else 's'}"


# ---- Data files: MNIST's IDX format and .npz ---------------------------------------------------

IDX_FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}


def read_idx_folder(folder):
    """The four IDX files (plain or gzip) as uint8 arrays, each checked against its header: magic
    number 0x0803 for images, 0x0801 for labels, then its dimensions."""
    arrays = {}
    for key, name in IDX_FILES.items():
        path = next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)
        if path is None:
            raise UsageError(f"{folder}: missing {name} (or {name}.gz)")
        try:
            with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
                raw = f.read()
        except (OSError, EOFError) as e:
            raise UsageError(f"{path}: cannot read ({e})") from None
        magic = 0x803 if key.startswith("x") else 0x801
        ndim, header = magic & 0xFF, 4 + 4 * (magic & 0xFF)
        if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
            raise UsageError(f"{path}: not an MNIST IDX file (its header is not that of "
                             f"magic number {magic:#06x})")
        shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
        if len(raw) - header != math.prod(shape):
            raise UsageError(f"{path}: header says shape {shape} but holds {len(raw) - header} "
                             "bytes")
        arrays[key] = np.frombuffer(raw, np.uint8, offset=header).reshape(shape)
    return arrays


def read_npz(path):
    try:
        arrays = fid.read_npz(path)
    except ValueError as e:
        raise UsageError(f"{path}: not a readable .npz file ({e.__cause__ or e})") from None
    missing = [key for key in IDX_FILES if key not in arrays]
    if missing:
        raise UsageError(f"{path}: missing array(s) {', '.join(missing)} "
                         f"(has {', '.join(arrays) or 'none'})")
    return arrays


def check_arrays(arrays, source, num_classes):
    """Shapes, dtypes, label range and counts, so that a wrong file fails now, not mid-run. Any
    image size goes, as long as both splits share it."""
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


# ---- Checkpoints and the training callback ----------------------------------------------------

INTERRUPTED = threading.Event()  # set by interrupt(): Ctrl-C, a kill, or a sweep pruning the run


def interrupt(signum, frame):
    """SIGINT and SIGTERM: KeyboardInterrupt, and a mark that stays: raised while a destructor
    runs, Python only prints the KeyboardInterrupt, and RunCallback raises it again."""
    INTERRUPTED.set()
    raise KeyboardInterrupt


def finite(logs):
    return all(math.isfinite(float(value)) for value in logs.values())


class RunCallback(keras.callbacks.Callback):
    """What a run keeps of each good epoch, in this order, so that a kill at any moment leaves a
    consistent run behind: the progress frame (the watched test images reconstructed and watch_z
    decoded; a kill may leave one too many, which a resume drops), the model as
    checkpoint-epochN.keras, then checkpoint.json naming it (the commit point: epochs, history,
    timings and the random generators' states, which a .keras file leaves out and an exact resume
    needs; Keras' BackupAndRestore keeps neither), then history.csv, the loss curves (when drawing
    them costs under 2% of the time since they were last drawn) and TensorBoard's image. A
    non-finite epoch is not kept and stops the run (diverged_epoch)."""

    def __init__(self, results_dir, config, resumed_from, title, unit, watch_images, watch_z,
                 watch_labels, tensorboard):
        super().__init__()
        self.results_dir, self.config, self.title, self.unit = results_dir, config, title, unit
        self.watch_images, self.watch_z, self.watch_labels = watch_images, watch_z, watch_labels
        self.history = dict(resumed_from["history"]) if resumed_from else {}
        self.seconds_per_epoch = list(resumed_from["seconds_per_epoch"]) if resumed_from else []
        self.frames = list(read_frames(results_dir)[:len(framed_epochs(self.epochs_done))])
        self.saved_epochs = self.epochs_done  # what the checkpoint on disk holds
        self.writer = tensorboard and tf.summary.create_file_writer(
            str(results_dir / "tensorboard" / "progress"))
        self.diverged_epoch, self.curves_drawn, self.curves_seconds = None, -math.inf, 0.0

    @property
    def epochs_done(self):
        return len(self.seconds_per_epoch)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if INTERRUPTED.is_set():
            raise KeyboardInterrupt

    def on_epoch_end(self, epoch, logs=None):
        if not finite(logs):
            self.diverged_epoch = self.epochs_done + 1
            self.model.stop_training = True
            return
        self.seconds_per_epoch.append(time.perf_counter() - self.epoch_start)
        for name, value in logs.items():
            self.history[name] = [*self.history.get(name, []), float(value)]
        framed = framed_epochs(self.epochs_done)[-1:] == [self.epochs_done]
        frame = self.progress_frame() if framed or self.writer else None
        if framed:
            self.frames.append(frame)
            fid.atomic_write(self.results_dir / PROGRESS_FRAMES,
                             lambda p: np.save(p, np.stack(self.frames)))
        model_file = f"checkpoint-epoch{self.epochs_done}.keras"
        save_model(self.model, self.results_dir / model_file)
        write_json(self.results_dir / CHECKPOINT_STATE, {
            "epochs_done": self.epochs_done, "model_file": model_file, "config": self.config,
            "history": self.history, "seconds_per_epoch": self.seconds_per_epoch,
            "random_states": [variable.numpy().tolist() for variable in random_states(self.model)]})
        self.saved_epochs = self.epochs_done
        for old in self.results_dir.glob("checkpoint-epoch*.keras"):
            if old.name != model_file:
                old.unlink(missing_ok=True)
        write_history_csv(self.results_dir / "history.csv", self.history, self.seconds_per_epoch)
        if epoch + 1 < self.params["epochs"] and self.curves_seconds <= 0.02 * (
                time.perf_counter() - self.curves_drawn):  # the run draws the last one
            start = time.perf_counter()
            save_figure(plot_utils.loss_curves(self.history, title=self.title, unit=self.unit),
                        self.results_dir / "loss_curves.png")
            self.curves_drawn = time.perf_counter()
            self.curves_seconds = self.curves_drawn - start
        if self.writer:
            with self.writer.as_default():
                tf.summary.image("progress", frame[None, :, :, None], step=epoch)
            self.writer.flush()

    def progress_frame(self):
        images_labels, samples_labels = self.watch_labels or (None, None)
        z_mean, _ = self.model.encoded(self.watch_images, images_labels)
        labels = None if images_labels is None else ops.concatenate([images_labels,
                                                                     samples_labels])
        decoded = ops.convert_to_numpy(self.model.decoded(
            ops.concatenate([z_mean, self.watch_z]), labels))
        count = len(self.watch_images)
        return plot_utils.progress_frame(self.watch_images, decoded[:count], decoded[count:])


def random_states(model):
    """The state of each random generator of the model (sampling, dropout, binarization)."""
    return [variable for variable in model.variables if variable.name == "seed_generator_state"]


def framed_epochs(epochs_done):
    """The epochs (from 1) whose progress frame a run keeps: each to 99, then every 10th to 990,
    every 100th to 9,900 and so on, so that a long run's animation stays short (212 frames of
    3,280 epochs)."""
    return [epoch for epoch in range(1, epochs_done + 1)
            if epoch % 10 ** max(0, len(str(epoch)) - 2) == 0]


def read_frames(results_dir):
    path = results_dir / PROGRESS_FRAMES
    return np.load(path) if path.is_file() else np.zeros((0, 0, 0), np.uint8)


def read_checkpoint(results_dir):
    """The checkpoint's state, or None. Its model file is checked where it is loaded: an evaluation
    needs only the history and timings."""
    path = results_dir / CHECKPOINT_STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        if "model_file" not in state:
            raise ValueError("it names no model file")
        return state
    except ValueError as e:
        raise UsageError(f"{path}: unusable checkpoint ({e}); "
                         "use --overwrite to start again") from None


def restore_checkpoint(results_dir, state):
    """The checkpointed model with its random generators where they were."""
    model = fid.load_model(results_dir / state["model_file"])
    for variable, value in zip(random_states(model), state.get("random_states", [])):
        variable.assign(value)
    return model


# ---- Outputs: each written to a temporary name and renamed (fid.atomic_write), never half ------

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


def save_progress_animation(results_dir, epochs_done):
    rows = ["test", "decoded", *["prior"] * math.ceil(WATCHED_SAMPLES / WATCHED_IMAGES)]
    images = plot_utils.progress_animation(read_frames(results_dir), framed_epochs(epochs_done),
                                           row_labels=rows)
    fid.atomic_write(results_dir / "progress.gif", lambda p: images[0].save(
        p, format="GIF", save_all=True, append_images=images[1:], duration=200, loop=0))


def machine_record():
    """The CPU that made a run: float32 results repeat to the last digit on one kind of CPU
    (isa: the widest of oneDNN's instruction sets it has) and differ in late digits across kinds;
    ONEDNN_MAX_CPU_ISA, when set, caps the kernels oneDNN runs."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    fields = {key.strip(): value.strip() for key, _, value in
              (line.partition(":") for line in cpuinfo.split("\n\n")[0].splitlines())}
    flags = fields.get("flags", "").split()
    return {"cpu": fields.get("model name", platform.machine()),
            "isa": next((kind for kind, flag in (("amx", "amx_bf16"), ("avx512", "avx512f"),
                                                 ("avx2", "avx2")) if flag in flags), "other"),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
            "cores": len(os.sched_getaffinity(0))}


# ---- Speed: grouped batches under XLA (--plain trains without: the same maths) --------------

XLA_MIN_BATCHES = 100  # XLA compiles for seconds: a training set of this many batches repays it
BATCHES_PER_STEP = 67  # batches per compiled step on the grouped path


def training_data(args, architecture, x_train, x_test, first_epoch, labels=None):
    """What model.fit takes: with --plain, arrays and Keras' batching; else make_datasets' groups
    of batches (of one batch without XLA, where larger groups gain nothing)."""
    if args.plain:
        targets = dict(y=labels[0], validation_data=(x_test, labels[1])) if labels else dict(
            validation_data=(x_test,))
        return dict(x=x_train, batch_size=args.batch_size, shuffle=True, **targets)
    if labels:
        x_train, x_test = (x_train, labels[0]), (x_test, labels[1])
    train, test, steps = make_datasets(x_train, x_test, args.batch_size,
                                       BATCHES_PER_STEP if architecture.xla else 1, args.seed,
                                       first_epoch)
    return dict(x=train, steps_per_epoch=steps, validation_data=test, shuffle=False)


def make_datasets(x_train, x_test, batch_size, batches_per_step, seed, first_epoch=0):
    """x_train and x_test: the images, or (images, one-hot labels) for a conditional VAE.

    A fresh seeded permutation each epoch, in groups of batches_per_step batches (VAE.train_step),
    prefetched while the previous group trains, across epoch ends too (one endless stream; fit
    takes steps_per_epoch from it each epoch). The groups hold exactly one epoch's batches, the
    smaller last one alone, so the updates are those of one batch per step. A resumed run starts
    at its first_epoch's permutation, as an unbroken run would.

    Returns (train, test, steps_per_epoch).
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


DENSE = Architecture(script="vae.py", title="Dense VAE", description=__doc__.splitlines()[0],
                     build_encoder=dense_encoder, build_decoder=dense_decoder,
                     add_options=add_dense_options, epochs=30, batch_size=64, iw_samples=1000,
                     xla=True)


if __name__ == "__main__":
    sys.exit(main())
