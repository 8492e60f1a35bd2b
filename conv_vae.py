"""Convolutional variational autoencoder on MNIST: the original repository's second model.

    python conv_vae.py --epochs 100

Only the encoder, the decoder, their options and the defaults live here (CONV, an Architecture),
then, under their own heading, the speed work (the convolutions as matrix products, a cheaper
dropout mask, cheaper forms of the decoder's work outside training); the model class, data,
training, checkpoints, evaluation and outputs are vae.py's.
"""

import sys

import fid
import vae  # first: it starts TensorFlow without its start-up lines (fid.start_tensorflow)

import keras
import tensorflow as tf
from keras import layers, ops


# ----------------------------------------------------------------------------------------------
# The networks
# ----------------------------------------------------------------------------------------------

def conv_encoder(args, image_shape, classes=0):
    """HxWx1 -> Conv(f, s2) -> Conv(2f, s2) -> Dropout -> Dense(32) -> (mean, log-variance);
    --dense-layers N stacks N dense layers of --dense-units there. A conditional VAE's label joins
    the convolutions' features, before the dense layers."""
    conv, _ = convolutions(args)
    x = keras.Input(image_shape)
    h = conv(args.filters, 3, strides=2, padding="same", activation=args.activation)(x)
    h = conv(2 * args.filters, 3, strides=2, padding="same", activation=args.activation)(h)
    inputs, h = vae.conditioned(x, layers.Flatten()(dropout(args)(h)), classes)
    h = vae.dense_layers(h, args.dense_units, args.dense_layers, args.activation)
    return keras.Model(inputs, vae.posterior_head(h, args.latent_dim), name="encoder")


def conv_decoder(args, image_shape, classes=0):
    """latent -> Dense(H/4 * W/4 * 2f) -> ConvT(2f, s2) -> ConvT(f, s2) -> Dropout -> ConvT(1,
    sigmoid); --dense-layers N puts N - 1 dense layers of --dense-units first, mirroring the
    encoder. A conditional VAE's label joins z."""
    _, conv_transpose = convolutions(args)
    height, width = image_shape[0] // 4, image_shape[1] // 4  # two stride-2 convolutions
    z = keras.Input((args.latent_dim,))
    inputs, h = vae.conditioned(z, z, classes)
    h = vae.dense_layers(h, args.dense_units, args.dense_layers - 1, args.activation)
    h = layers.Dense(height * width * 2 * args.filters, activation=args.activation)(h)
    h = layers.Reshape((height, width, 2 * args.filters))(h)
    h = conv_transpose(2 * args.filters, 3, strides=2, padding="same",
                       activation=args.activation)(h)
    h = conv_transpose(args.filters, 3, strides=2, padding="same", activation=args.activation)(h)
    h = dropout(args)(h)
    logits = conv_transpose(1, 3, padding="same")(h)
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


CONV = vae.Architecture(
    script="conv_vae.py", title="Convolutional VAE", description=__doc__.splitlines()[0],
    build_encoder=conv_encoder, build_decoder=conv_decoder, add_options=add_conv_options,
    epochs=100, batch_size=128, iw_samples=100,
    xla=False, batches_per_step=1,  # XLA's CPU convolutions are slow; groups need XLA to gain
    image_side_multiple=4)  # two stride-2 convolutions, undone by two in the decoder


# ----------------------------------------------------------------------------------------------
# Speed: the convolutions as matrix products and a cheaper dropout mask, where they are faster
# (MATMUL_DTYPES), and outside training cheaper forms of the decoder's last layer (float32) and of
# its bias and activation (bfloat16); --plain uses Keras' own layers. Same variables, same
# function: a reader who skips this section reads the whole model above.
# ----------------------------------------------------------------------------------------------

# Compute dtypes in which MatmulConv2D and MatmulConv2DTranspose run their matrix-product forms
# instead of Keras' op. tests/bench/bench_training.py times each layer both ways (results/README.md,
# Speed): TF's float32 convolutions are the faster on every CPU measured; its bfloat16 ones are
# 6.3x slower in a training step on AVX2, but faster than the forms where oneDNN has bfloat16
# kernels: AMX's matrix tiles (a whole step 1.1x to 1.8x faster on three AMX CPUs) and AVX512_BF16's
# dot products (the convolutions 1.6x faster on an AMX CPU capped to them by ONEDNN_MAX_CPU_ISA).
MATMUL_DTYPES = (() if vae.cpu_isa()[1] in ("AVX512_CORE_AMX", "AVX512_CORE_BF16")
                 else ("bfloat16",))


# Sub-pixel form of a 3x3 stride-2 "same" transposed convolution: output row 2m + p takes kernel row
# 0 from input row m and row 2 from row m - 1 (p = 0), or row 1 from row m (p = 1).
# SUBPIXEL_ROWS[a][p]: the kernel row that input row m - 1 + a gives output phase p (3: none, a
# zero row); the same table serves the columns.
SUBPIXEL_ROWS = ((2, 3), (0, 1))


def convolutions(args):
    """Keras' own Conv2D and Conv2DTranspose with --plain (the speed baseline), the matrix-product
    forms otherwise."""
    return ((layers.Conv2D, layers.Conv2DTranspose) if args.plain
            else (MatmulConv2D, MatmulConv2DTranspose))


def dropout(args):
    """Keras' own layer with --plain (the speed baseline), the cheaper mask otherwise."""
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


def products(columns, matrix):
    """(batch, height, width, k) @ (k, n) -> (batch, height, width, n): one matrix product over
    every position of every image."""
    height, width, depth = columns.shape[1:]
    flat = ops.matmul(ops.reshape(columns, (-1, depth)), matrix)
    return ops.reshape(flat, (-1, height, width, matrix.shape[1]))


def shifted(x, top, left, height, width, first_channel=0, channels=None):
    """A (height, width) window of x from (top, left), channels [first, first + channels): tf.slice,
    whose gradient is one pad (a strided slice's is several times slower)."""
    return tf.slice(x, (0, top, left, first_channel),
                    (-1, height, width, x.shape[3] if channels is None else channels))


def conv_as_matmul(x, kernel):
    """A 3x3 stride-2 "same" convolution of an even-sized map as one matrix product: output (i, j)
    reads input rows and columns 2i .. 2i + 2 (the last one past the edge is zero), which
    space_to_depth makes rows i and i + 1 of four phase planes; the nine taps side by side
    (im2col) times the kernel as a (9 x channels, filters) matrix."""
    height, width, channels = x.shape[1] // 2, x.shape[2] // 2, x.shape[3]
    phases = tf.nn.space_to_depth(ops.pad(x, ((0, 0), (0, 2), (0, 2), (0, 0))), 2)
    taps = [shifted(phases, row // 2, column // 2, height, width,
                    (2 * (row % 2) + column % 2) * channels, channels)
            for row in range(3) for column in range(3)]
    return products(ops.concatenate(taps, axis=-1), ops.reshape(kernel, (9 * channels, -1)))


def subpixel_matrix(kernel):
    """Keras' (3, 3, filters, channels) transposed kernel as the (2 x 2 x channels, 2 x 2 x filters)
    matrix of the sub-pixel form: 2x2 window offset (a, b) to output phase (p, q) is kernel tap
    [SUBPIXEL_ROWS[a][p], SUBPIXEL_ROWS[b][q]], zero where that phase has none."""
    filters, channels = kernel.shape[2:]
    padded = ops.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))
    taps = ops.take(ops.take(padded, SUBPIXEL_ROWS, axis=0), SUBPIXEL_ROWS, axis=2)  # a p b q f c
    return ops.reshape(ops.transpose(taps, (0, 2, 5, 1, 3, 4)), (4 * channels, 4 * filters))


@tf.custom_gradient
def sum_taps(taps):
    """(batch, height, width, 9 x filters) products of each kernel tap -> (batch, height, width,
    filters): output (i, j) adds tap (k, l)'s product at (i + 1 - k, j + 1 - l), zero outside
    (col2im). Its gradient reads each tap's window of the upstream gradient (im2col) instead of
    adding up nine zero-padded full-size copies, as autodiff of the slices would."""
    height, width, filters = taps.shape[1], taps.shape[2], taps.shape[3] // 9
    padded = ops.pad(taps, ((0, 0), (1, 1), (1, 1), (0, 0)))
    total = tf.add_n([shifted(padded, 2 - k, 2 - l, height, width, (3 * k + l) * filters, filters)
                      for k in range(3) for l in range(3)])

    def gradient(upstream):
        padded = ops.pad(upstream, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return ops.concatenate([shifted(padded, k, l, height, width)
                                for k in range(3) for l in range(3)], axis=-1)

    return total, gradient


def conv_transpose_as_matmul(x, kernel, stride):
    """A 3x3 "same" transposed convolution as one matrix product. Stride 2: the sub-pixel form (Shi
    et al. 2016), a 2x2 window of the small map times subpixel_matrix, each output phase's filters
    then moved to its pixel by depth_to_space: no zero-stuffed input. Stride 1: each position's
    channels times every tap's filters at once, then summed at their offsets (sum_taps)."""
    height, width, channels = x.shape[1:]
    if stride == 2:
        padded = ops.pad(x, ((0, 0), (1, 0), (1, 0), (0, 0)))
        window = ops.concatenate([shifted(padded, a, b, height, width)
                                  for a in range(2) for b in range(2)], axis=-1)
        return tf.nn.depth_to_space(products(window, subpixel_matrix(kernel)), 2)
    return sum_taps(products(x, ops.reshape(ops.transpose(kernel, (3, 0, 1, 2)), (channels, -1))))


def one_filter_as_depthwise(x, kernel):
    """A 3x3 stride-1 "same" transposed convolution to one filter (the decoder's last layer) as each
    channel convolved with its own flipped taps (a depthwise convolution), then summed over the
    channels. oneDNN's float32 transposed convolution to a single channel is slow for its 4% of
    the decoder's arithmetic; this form is 2.3x faster on an AMX CPU, 2.0x on oneDNN's AVX2
    kernels, and the likelihood estimate 1.19x (results/README.md, Speed)."""
    taps = ops.flip(ops.flip(kernel, axis=0), axis=1)  # (3, 3, 1, channels)
    per_channel = tf.nn.depthwise_conv2d(x, ops.transpose(taps, (0, 1, 3, 2)), (1, 1, 1, 1), "SAME")
    return ops.sum(per_channel, axis=-1, keepdims=True)


@tf.function(jit_compile=True)
def bias_and_activation(x, bias, activation):
    """activation(x + bias) in one pass compiled by XLA, for bfloat16 outside training: the same
    bits as TensorFlow's bfloat16 BiasAdd and Relu, which convert element by element; the
    bfloat16 likelihood estimate runs 1.27x faster on an AMX CPU (results/README.md, Speed)."""
    return activation(x + bias)


def three_by_three_same(layer):
    return (layer.kernel_size == (3, 3) and layer.padding == "same"
            and layer.data_format == "channels_last" and layer.dilation_rate == (1, 1))


def uses_matmul(layer, input_shape):
    """Whether the layer's convolution runs in its matrix-product form (MATMUL_DTYPES)."""
    return layer.compute_dtype in MATMUL_DTYPES and layer.matmul_form(input_shape) is not None


@keras.saving.register_keras_serializable(package="mnist_vae")
class MatmulConv2D(layers.Conv2D):
    """Conv2D (same variables, same function) whose 3x3 stride-2 convolutions of even-sized maps
    can run as one matrix product (conv_as_matmul)."""

    def matmul_form(self, input_shape):
        if (three_by_three_same(self) and self.strides == (2, 2) and self.groups == 1
                and input_shape[1] % 2 == 0 and input_shape[2] % 2 == 0):
            return "im2col"
        return None

    def convolution_op(self, inputs, kernel):
        if uses_matmul(self, inputs.shape):
            return conv_as_matmul(inputs, kernel)
        return super().convolution_op(inputs, kernel)


@keras.saving.register_keras_serializable(package="mnist_vae")
class MatmulConv2DTranspose(layers.Conv2DTranspose):
    """Conv2DTranspose (same variables, same function) whose 3x3 transposed convolutions of stride
    2 or 1 can run as one matrix product (conv_transpose_as_matmul). Outside training, a float32
    stride-1 convolution to one filter runs as a depthwise one (one_filter_as_depthwise), and in
    bfloat16 the bias and activation run as one XLA program (bias_and_activation); training keeps
    Keras' ops there, so float32 training is Keras' own arithmetic to the last digit."""

    def matmul_form(self, input_shape):
        if three_by_three_same(self) and self.output_padding is None:
            return {(2, 2): "subpixel", (1, 1): "col2im"}.get(self.strides)
        return None

    def call(self, inputs, training=None):
        kernel = ops.convert_to_tensor(self.kernel)
        inference_in = None if training else self.compute_dtype
        if (inference_in == "float32" and self.filters == 1
                and self.matmul_form(inputs.shape) == "col2im"):
            outputs = one_filter_as_depthwise(inputs, kernel)
        elif uses_matmul(self, inputs.shape):
            outputs = conv_transpose_as_matmul(inputs, kernel, self.strides[0])
        elif inference_in == "bfloat16" and self.use_bias:
            outputs = ops.conv_transpose(inputs, kernel, self.strides, self.padding,
                                         self.output_padding, self.data_format, self.dilation_rate)
        else:
            return super().call(inputs)
        if not self.use_bias:
            return self.activation(outputs)
        if inference_in == "bfloat16":
            return bias_and_activation(outputs, ops.cast(self.bias.value, outputs.dtype),
                                       self.activation)
        return self.activation(outputs + self.bias)


# ----------------------------------------------------------------------------------------------
# The script
# ----------------------------------------------------------------------------------------------

if __name__ == "__main__":
    sys.exit(vae.main(architecture=CONV))
