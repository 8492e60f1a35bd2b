"""Convolutional variational autoencoder on MNIST: the original repository's second model.

    python conv_vae.py --epochs 100

Only the encoder, the decoder and the defaults live here; the model class, data, training,
checkpoints, evaluation and outputs are vae.py's.
"""

import sys

import keras
from keras import layers

import fid
import vae


def conv_encoder(args):
    """28x28x1 -> Conv(f, s2) -> Conv(2f, s2) -> Dropout -> Dense(32) -> (mean, log-variance)."""
    x = keras.Input(vae.IMAGE_SHAPE)
    h = layers.Conv2D(args.filters, 3, strides=2, padding="same", activation="relu")(x)
    h = layers.Conv2D(2 * args.filters, 3, strides=2, padding="same", activation="relu")(h)
    h = layers.Dropout(args.dropout)(h)
    h = layers.Dense(32, activation="relu")(layers.Flatten()(h))
    z_mean = layers.Dense(args.latent_dim, name="z_mean")(h)
    z_log_var = layers.Dense(args.latent_dim, name="z_log_var")(h)
    return keras.Model(x, [z_mean, z_log_var], name="encoder")


def conv_decoder(args):
    """latent -> Dense(7*7*2f) -> ConvT(2f, s2) -> ConvT(f, s2) -> Dropout -> ConvT(1, sigmoid)."""
    z = keras.Input((args.latent_dim,))
    h = layers.Dense(7 * 7 * 2 * args.filters, activation="relu")(z)
    h = layers.Reshape((7, 7, 2 * args.filters))(h)
    h = layers.Conv2DTranspose(2 * args.filters, 3, strides=2, padding="same", activation="relu")(h)
    h = layers.Conv2DTranspose(args.filters, 3, strides=2, padding="same", activation="relu")(h)
    h = layers.Dropout(args.dropout)(h)
    x_hat = layers.Conv2DTranspose(1, 3, padding="same", activation="sigmoid")(h)
    return keras.Model(z, x_hat, name="decoder")


def add_conv_arguments(group):
    group.add_argument("--filters", type=fid.positive_int, default=32, help="filters of the first convolution (the second has twice as many)")
    group.add_argument("--dropout", type=vae.unit_interval, default=0.25, help="dropout rate, active only while training")
    return ("filters", "dropout")


if __name__ == "__main__":
    sys.exit(vae.main(title="Convolutional VAE", build_encoder=conv_encoder, build_decoder=conv_decoder,
                      epochs=100, batch_size=128, results_dir="results/conv_vae", add_arguments=add_conv_arguments,
                      xla=False, most_steps_per_execution=1, iw_samples=500))
