"""Convolutional variational autoencoder on MNIST: the original repository's second model.

    python conv_vae.py --epochs 100

Only the networks, their options and the defaults live here; the model, data, training,
checkpoints, evaluation and outputs are vae.py's.
"""

import sys

import fid
import vae  # first: it starts TensorFlow without its start-up lines

import keras
import tensorflow as tf
from keras import layers


def conv_encoder(args, image_shape, classes=0):
    """HxWx1 -> Conv(f, s2) -> Conv(2f, s2) -> Dropout -> Dense(32) -> (mean, log-variance);
    --dense-layers N stacks N dense layers of --dense-units there. A conditional VAE's label joins
    the convolutions' features, before the dense layers."""
    x = keras.Input(image_shape)
    h = layers.Conv2D(args.filters, 3, strides=2, padding="same", activation=args.activation)(x)
    h = layers.Conv2D(2 * args.filters, 3, strides=2, padding="same",
                      activation=args.activation)(h)
    inputs, h = vae.conditioned(x, layers.Flatten()(dropout(args)(h)), classes)
    h = vae.dense_layers(h, args.dense_units, args.dense_layers, args.activation)
    return keras.Model(inputs, vae.posterior_head(h, args.latent_dim), name="encoder")


def conv_decoder(args, image_shape, classes=0):
    """latent -> Dense(H/4 * W/4 * 2f) -> ConvT(2f, s2) -> ConvT(f, s2) -> Dropout -> ConvT(1,
    sigmoid); --dense-layers N puts N - 1 dense layers of --dense-units first, mirroring the
    encoder. A conditional VAE's label joins z."""
    height, width = image_shape[0] // 4, image_shape[1] // 4  # two stride-2 convolutions
    z = keras.Input((args.latent_dim,))
    inputs, h = vae.conditioned(z, z, classes)
    h = vae.dense_layers(h, args.dense_units, args.dense_layers - 1, args.activation)
    h = layers.Dense(height * width * 2 * args.filters, activation=args.activation)(h)
    h = layers.Reshape((height, width, 2 * args.filters))(h)
    for filters in (2 * args.filters, args.filters):
        h = layers.Conv2DTranspose(filters, 3, strides=2, padding="same",
                                   activation=args.activation)(h)
    h = dropout(args)(h)
    logits = layers.Conv2DTranspose(1, 3, padding="same")(h)
    x_hat = layers.Activation("sigmoid", dtype="float32")(logits)  # see vae.posterior_head
    return keras.Model(inputs, x_hat, name="decoder")


def add_conv_options(group):
    group.add_argument("--filters", type=fid.positive_int, default=32,
                       help="filters of the first convolution (the second has twice as many)")
    group.add_argument("--dense-units", type=fid.positive_int, default=32,
                       help="units of the dense layers between the convolutions and z")
    group.add_argument("--dense-layers", type=fid.positive_int, default=1,
                       help="dense layers after the encoder's convolutions; the decoder gets one "
                            "fewer before its own")
    group.add_argument("--dropout", type=fid.unit_interval, default=0.25,
                       help="dropout rate, active only while training")


def dropout(args):
    """ByteDropout, or Keras' own layer with --plain (the speed baseline)."""
    return (layers.Dropout if args.plain else ByteDropout)(args.dropout)


@keras.saving.register_keras_serializable(package="mnist_vae")
class ByteDropout(layers.Dropout):
    """Dropout with the same Bernoulli mask drawn 4x cheaper: one random byte per element, kept
    when byte >= 256 * rate, instead of one random float (Keras' float generator is the decoder's
    costliest op after the convolutions). Exact only when 256 * rate is a whole number
    (0.25 -> 64); any other rate uses Keras' own mask."""

    def call(self, inputs, training=False):
        threshold = 256 * self.rate
        if (not training or self.rate == 0 or threshold != int(threshold)
                or self.noise_shape is not None):
            return super().call(inputs, training=training)
        size = tf.size(inputs)
        seed = tf.cast(self.seed_generator.next(), tf.int32)
        words = tf.random.stateless_uniform([(size + 3) // 4], seed=seed,
                                            dtype=tf.uint32, minval=None, maxval=None)
        random_bytes = tf.reshape(tf.reshape(tf.bitcast(words, tf.uint8), [-1])[:size],
                                  tf.shape(inputs))
        return inputs / (1.0 - self.rate) * tf.cast(random_bytes >= int(threshold), inputs.dtype)


# Model files saved when the convolutions had matrix-product forms name these classes, and file
# their weights under the names: Keras' own layers, under the old names, load them.
@keras.saving.register_keras_serializable(package="mnist_vae")
class MatmulConv2D(layers.Conv2D):
    """Keras' Conv2D, as older model files name it."""


@keras.saving.register_keras_serializable(package="mnist_vae")
class MatmulConv2DTranspose(layers.Conv2DTranspose):
    """Keras' Conv2DTranspose, as older model files name it."""


CONV = vae.Architecture(
    script="conv_vae.py", title="Convolutional VAE", description=__doc__.splitlines()[0],
    build_encoder=conv_encoder, build_decoder=conv_decoder, add_options=add_conv_options,
    epochs=100, batch_size=128, iw_samples=100,
    xla=False,  # XLA's CPU convolutions are slow
    image_side_multiple=4)  # two stride-2 convolutions, undone by two in the decoder

if __name__ == "__main__":
    sys.exit(vae.main(architecture=CONV))
