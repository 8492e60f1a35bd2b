"""conv_vae.py: the convolutional encoder/decoder on vae.py's pipeline, end to end."""

import argparse
import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import QUICK, error_lines, run_main, shared_run

import conv_vae
import vae


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_mnist):
    return shared_run(tmp_path_factory, "conv_vae.py", "--data", tiny_mnist, *QUICK, "--filters", "8")


def test_run_writes_every_output(finished_run):
    results_dir, result = finished_run
    metrics = json.loads((results_dir / "metrics.json").read_text())
    for name in ("model.keras", "history.csv", "loss_curves.png", "reconstruction_images.png",
                 "latent_space_representation.png", "manifold.png", "samples.png"):
        assert (results_dir / name).stat().st_size > 0, name
    assert metrics["model"] == "Convolutional VAE" and metrics["config"]["filters"] == 8
    assert len(metrics["seconds_per_epoch"]) == 2
    assert not {"xla", "batches_per_step"} & metrics["config"].keys()  # command-line options only
    assert np.isfinite([metrics["fid_pixel_recon"], metrics["fid_pixel_samples"], metrics["test_log_likelihood_iw"]]).all()
    assert "Convolutional VAE: 2 epochs" in result.stdout


def test_saved_model_with_custom_layers_reproduces_its_reconstructions(finished_run, tiny_mnist):
    results_dir, _ = finished_run
    model = keras.models.load_model(results_dir / "model.keras")
    assert isinstance(model, vae.VAE) and isinstance(model.sampling, vae.Sampling)
    assert len(vae.random_states(model)) == 4  # sampling, binarization, two dropouts: a resume goes on with each
    x_test = vae.to_float_images(vae.load_dataset(tiny_mnist)[2])
    reconstructions, terms = vae.evaluate_elbo(model, x_test, seed=0)
    metrics = json.loads((results_dir / "metrics.json").read_text())
    assert float(-np.mean(sum(terms.values()))) == pytest.approx(metrics["test_elbo"], rel=1e-5)
    np.testing.assert_array_equal(reconstructions, vae.evaluate_elbo(vae.load_saved_model(results_dir / "model.keras"),
                                                                     x_test, seed=0)[0])


def test_dropout_is_off_at_inference(finished_run, tiny_mnist):
    model = vae.load_saved_model(finished_run[0] / "model.keras")
    x = vae.to_float_images(vae.load_dataset(tiny_mnist)[2][:16])
    z_mean, _ = model.encoder(x, training=False)
    np.testing.assert_array_equal(z_mean, model.encoder(x, training=False)[0])
    np.testing.assert_array_equal(model.decoder(z_mean, training=False), model.decoder(z_mean, training=False))
    assert not np.allclose(model.decoder(z_mean, training=True), model.decoder(z_mean, training=True))


@pytest.mark.parametrize("plain, conv, dropout", [(False, "MatmulConv2D", "ByteDropout"),
                                                  (True, "Conv2D", "Dropout")])
def test_architecture_matches_the_original(plain, conv, dropout):
    args = argparse.Namespace(latent_dim=2, filters=32, dense_units=32, dense_layers=1, dropout=0.25, plain=plain, activation="relu")
    encoder, decoder = conv_vae.conv_encoder(args, (28, 28, 1)), conv_vae.conv_decoder(args, (28, 28, 1))
    assert [layer.__class__.__name__ for layer in encoder.layers[1:]] == [
        conv, conv, dropout, "Flatten", "Dense", "Dense", "Dense"]
    assert encoder.layers[2].output.shape == (None, 7, 7, 64) and encoder.layers[5].units == 32
    assert [layer.__class__.__name__ for layer in decoder.layers[1:]] == [
        "Dense", "Reshape", *[f"{conv}Transpose"] * 2, dropout, f"{conv}Transpose", "Activation"]
    assert decoder.output.shape == (None, 28, 28, 1) and decoder.layers[-1].get_config()["activation"] == "sigmoid"


def test_activation_and_dense_layers_reach_both_networks():
    args = argparse.Namespace(latent_dim=2, filters=4, dense_units=16, dense_layers=2, dropout=0.0, plain=False, activation="elu")
    hidden = [layer for network in (conv_vae.conv_encoder(args, (28, 28, 1)), conv_vae.conv_decoder(args, (28, 28, 1))) for layer in network.layers
              if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose, keras.layers.Dense)) and layer.name not in ("z_mean", "z_log_var")
              and not (isinstance(layer, keras.layers.Conv2DTranspose) and layer.filters == 1)]
    assert len(hidden) == 8 and {layer.get_config()["activation"] for layer in hidden} == {"elu"}
    assert [layer.units for layer in hidden if isinstance(layer, keras.layers.Dense)] == [16, 16, 16, 7 * 7 * 8]


def test_conditional_networks_take_the_label_after_the_convolutions_and_beside_z():
    args = argparse.Namespace(latent_dim=2, filters=4, dense_units=16, dense_layers=1, dropout=0.0, plain=False,
                              activation="relu")
    encoder, decoder = (build(args, (28, 28, 1), 10) for build in (conv_vae.conv_encoder, conv_vae.conv_decoder))
    assert [tuple(tensor.shape[1:]) for tensor in encoder.inputs] == [(28, 28, 1), (10,)]
    assert [tuple(tensor.shape[1:]) for tensor in decoder.inputs] == [(2,), (10,)]
    [joined] = [layer for layer in encoder.layers if isinstance(layer, keras.layers.Concatenate)]
    assert joined.output.shape[-1] == 7 * 7 * 8 + 10  # the flattened convolutions, then the label
    z = np.zeros((1, 2), np.float32)
    outputs = [keras.ops.convert_to_numpy(decoder([z, np.eye(10, dtype=np.float32)[[label]]])) for label in (3, 8)]
    assert not np.array_equal(*outputs)


def test_bfloat16_convolutions_with_float32_posterior_and_pixels():
    args = argparse.Namespace(latent_dim=2, filters=8, dense_units=32, dense_layers=1, dropout=0.25, plain=False, activation="relu", dtype_policy="mixed_bfloat16",
                              likelihood="gaussian", binarize="none", seed=0, beta=1.0, kl_warmup_epochs=0, conditional=False)
    model = vae.build_model(args, conv_vae.CONV, (28, 28, 1))
    x = np.random.default_rng(0).random((4, 28, 28, 1)).astype(np.float32)
    model(x)
    convolutions = [layer for part in (model.encoder, model.decoder) for layer in part.layers
                    if "Conv" in layer.__class__.__name__ or "Dropout" in layer.__class__.__name__]
    assert len(convolutions) == 7 and all(layer.compute_dtype == "bfloat16" for layer in convolutions)
    z_mean, z_log_var = model.encoder(x, training=True)
    pixels = model.decoder(z_mean, training=True)
    assert [keras.backend.standardize_dtype(t.dtype) for t in (z_mean, z_log_var, pixels)] == ["float32"] * 3
    kept = keras.ops.convert_to_numpy(conv_vae.ByteDropout(0.25, seed=0, dtype="mixed_bfloat16")(
        np.ones((8, 28, 28, 32), np.float32), training=True))
    assert set(np.unique(kept.astype(np.float32))) == {0.0, np.float32(keras.ops.cast(1 / 0.75, "bfloat16"))}


def relative_difference(expected, actual):
    """Largest absolute difference over the largest magnitude."""
    expected, actual = (np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(t, "float32")), np.float64)
                        for t in (expected, actual))
    return np.abs(actual - expected).max() / np.abs(expected).max()


def forward_and_gradients(layer, x):
    """The layer's output in training, and the gradients of a weighted sum of it for its input and
    weights (weights in [1, 3]: sums that do not cancel, so bfloat16's rounding stays relative)."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        weights = 2 + tf.cos(tf.reshape(tf.range(tf.size(y), dtype=tf.float32), tf.shape(y)))
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * weights)
    return [y, *tape.gradient(loss, [x, *layer.trainable_weights])]


@pytest.fixture
def spied_matmul_forms(monkeypatch):
    """The names of the matrix-product forms, once per call."""
    calls = []
    for name in ("conv_as_matmul", "conv_transpose_as_matmul"):
        form = getattr(conv_vae, name)
        monkeypatch.setattr(conv_vae, name,
                            lambda *args, form=form: calls.append(form.__name__) or form(*args))
    return calls


CONVOLUTIONS = {  # Keras' layer, its options, a tiny input shape: each kind the networks hold
    "first, 1 channel": (keras.layers.Conv2D, dict(filters=5, strides=2), (3, 8, 6, 1)),
    "second": (keras.layers.Conv2D, dict(filters=5, strides=2), (3, 6, 8, 4)),
    "transposed, stride 2": (keras.layers.Conv2DTranspose, dict(filters=5, strides=2), (3, 4, 3, 6)),
    "last, 1 filter": (keras.layers.Conv2DTranspose, dict(filters=1, strides=1), (3, 5, 4, 6)),
    "transposed, stride 1": (keras.layers.Conv2DTranspose, dict(filters=3, strides=1), (3, 5, 4, 6)),
}


def layer_pair(name, dtype="float32", activation="elu"):
    """Keras' layer and its matrix-product subclass with the same weights (a nonzero bias)."""
    keras_class, options, shape = CONVOLUTIONS[name]
    keras.utils.set_random_seed(0)
    options = dict(kernel_size=3, padding="same", activation=activation, dtype=dtype, **options)
    reference = keras_class(bias_initializer="random_normal", **options)
    fast = getattr(conv_vae, f"Matmul{keras_class.__name__}")(**options)
    x = tf.constant(np.random.default_rng(0).standard_normal(shape), tf.float32)
    reference(x), fast(x)
    fast.set_weights(reference.get_weights())
    assert [(w.name, w.shape) for w in fast.weights] == [(w.name, w.shape) for w in reference.weights]
    return reference, fast, x


def matmul_forms_in_float32(monkeypatch):
    """The forms in float32 too, to compare at float32's precision."""
    monkeypatch.setattr(conv_vae, "MATMUL_DTYPES", ("float32", "bfloat16"))


@pytest.mark.parametrize("name", CONVOLUTIONS)
def test_matmul_forms_equal_keras_layers_with_the_same_weights(name, monkeypatch,
                                                               spied_matmul_forms):
    matmul_forms_in_float32(monkeypatch)
    reference, fast, x = layer_pair(name)
    expected, actual = forward_and_gradients(reference, x), forward_and_gradients(fast, x)
    assert spied_matmul_forms
    for a, b in zip(expected, actual):  # output; gradients of the input, kernel and bias
        assert a.shape == b.shape and relative_difference(a, b) < 1e-5


@pytest.mark.parametrize("name", CONVOLUTIONS)
@pytest.mark.parametrize("matmul_dtypes", [("bfloat16",), ()], ids=["without AMX", "with AMX"])
def test_convolutions_run_as_matrix_products_only_in_the_chosen_dtypes(name, matmul_dtypes,
                                                                       spied_matmul_forms,
                                                                       monkeypatch):
    monkeypatch.setattr(conv_vae, "MATMUL_DTYPES", matmul_dtypes)
    reference, fast, x = layer_pair(name)
    np.testing.assert_array_equal(reference(x, training=True), fast(x, training=True))
    assert not spied_matmul_forms
    reference, fast, x = layer_pair(name, dtype="mixed_bfloat16")
    expected, actual = forward_and_gradients(reference, x), forward_and_gradients(fast, x)
    assert bool(spied_matmul_forms) == bool(matmul_dtypes)
    assert keras.backend.standardize_dtype(actual[0].dtype) == "bfloat16"
    for a, b in zip(expected, actual):
        assert relative_difference(a, b) < 0.05  # bfloat16: 2^-8 = 0.4% per rounding; sums of them


@pytest.mark.parametrize("name", ["last, 1 filter", "transposed, stride 1"])
def test_one_filter_runs_depthwise_in_float32_outside_training_only(name, monkeypatch):
    calls = []
    monkeypatch.setattr(conv_vae, "one_filter_as_depthwise",
                        lambda *args, form=conv_vae.one_filter_as_depthwise:
                        calls.append(1) or form(*args))
    reference, fast, x = layer_pair(name)
    calls.clear()  # building the layer called it once
    np.testing.assert_array_equal(reference(x, training=True), fast(x, training=True))
    assert not calls  # training: Keras' op, the same digits
    assert relative_difference(reference(x), fast(x)) < 1e-5
    assert calls == [1] * (reference.filters == 1)
    reference, fast, x = layer_pair(name, dtype="mixed_bfloat16")
    calls.clear()
    fast(x)
    assert not calls  # float32 only


@pytest.mark.parametrize("name", [name for name in CONVOLUTIONS if "transposed" in name
                                  or "filter" in name])
@pytest.mark.parametrize("matmul_dtypes", [("bfloat16",), ()], ids=["without AMX", "with AMX"])
def test_bfloat16_bias_and_activation_run_in_one_pass_outside_training_with_the_same_bits(
        name, matmul_dtypes, monkeypatch):
    monkeypatch.setattr(conv_vae, "MATMUL_DTYPES", matmul_dtypes)
    calls = []
    monkeypatch.setattr(conv_vae, "bias_and_activation",
                        lambda *args, fused=conv_vae.bias_and_activation:
                        calls.append(1) or fused(*args))
    reference, fast, x = layer_pair(name, dtype="mixed_bfloat16", activation="relu")
    calls.clear()  # building the layer called it once
    fast(x, training=True)
    assert not calls  # training: Keras' ops (or the matrix-product form's), the same digits
    expected = reference(x) if not matmul_dtypes else fast(x, training=True)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(keras.ops.cast(fast(x), "float32")),
                                  keras.ops.convert_to_numpy(keras.ops.cast(expected, "float32")))
    assert calls == [1]


def conv_args(plain):
    return argparse.Namespace(latent_dim=2, filters=4, dense_units=8, dense_layers=1, dropout=0.25,
                              plain=plain, activation="relu", dtype_policy="float32",
                              likelihood="gaussian", binarize="none", seed=0, beta=1.0,
                              kl_warmup_epochs=0, conditional=False)


def test_model_saved_with_keras_layers_loads_and_matmul_forms_reproduce_it(tmp_path, tiny_mnist,
                                                                            monkeypatch):
    x = vae.to_float_images(vae.load_dataset(tiny_mnist)[2][:8])
    earlier = vae.build_model(conv_args(plain=True), conv_vae.CONV, x.shape[1:])  # Keras' layers
    earlier(x)
    vae.save_model(earlier, tmp_path / "model.keras")
    loaded = vae.load_saved_model(tmp_path / "model.keras")
    z = loaded.encoder(x)[0]
    np.testing.assert_array_equal(z, earlier.encoder(x)[0])
    np.testing.assert_array_equal(loaded.decoder(z), earlier.decoder(z))
    matmul_forms_in_float32(monkeypatch)
    fast = vae.build_model(conv_args(plain=False), conv_vae.CONV, x.shape[1:])
    fast(x)
    fast.set_weights(loaded.get_weights())  # the same variables, in the same order and shapes
    assert relative_difference(z, fast.encoder(x)[0]) < 1e-5
    assert relative_difference(loaded.decoder(z), fast.decoder(z)) < 1e-5


def test_checkpoint_with_keras_layers_restores_and_trains_on(tmp_path, tiny_mnist):
    x = vae.to_float_images(vae.load_dataset(tiny_mnist)[0][:32])
    earlier = vae.build_model(conv_args(plain=True), conv_vae.CONV, x.shape[1:])
    earlier(x[:1])
    earlier.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=True)
    earlier.train_on_batch(x[:16])
    vae.save_model(earlier, tmp_path / "checkpoint-epoch1.keras")
    state = {"model_file": "checkpoint-epoch1.keras",
             "random_states": [v.numpy() for v in vae.random_states(earlier)]}
    restored = vae.restore_checkpoint(tmp_path, state)  # as --resume restores it
    assert {"Conv2DTranspose", "Dropout"} <= {layer.__class__.__name__
                                              for layer in restored.decoder.layers}
    for a, b in zip(restored.get_weights() + vae.random_states(restored),
                    earlier.get_weights() + vae.random_states(earlier)):
        np.testing.assert_array_equal(a, b)
    logs = restored.train_on_batch(x[16:], return_dict=True)
    assert int(restored.optimizer.iterations) == 2 and math.isfinite(logs["loss"])


def test_short_run_with_matmul_forms_follows_keras_layers(tiny_mnist, monkeypatch,
                                                          spied_matmul_forms):
    """Adam updates from the same weights, dropout masks and noise: the losses and weights differ by
    float32 rounding only."""
    x = vae.to_float_images(vae.load_dataset(tiny_mnist)[0][:64])
    losses, weights = {}, {}
    for forms in ("keras", "matmul"):
        if forms == "matmul":
            matmul_forms_in_float32(monkeypatch)
        keras.utils.set_random_seed(0)
        model = vae.build_model(conv_args(plain=False), conv_vae.CONV, x.shape[1:])
        model(x[:1])
        model.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=True)  # quicker here
        losses[forms] = []
        for batch in np.split(x, 4):
            model.reset_metrics()
            losses[forms].append(model.train_on_batch(batch, return_dict=True)["loss"])
        weights[forms] = model.get_weights()
    assert set(spied_matmul_forms) == {"conv_as_matmul", "conv_transpose_as_matmul"}
    loss_difference = relative_difference(losses["keras"], losses["matmul"])
    weight_difference = max(np.abs(a - b).max() for a, b in zip(weights["keras"], weights["matmul"]))
    print(f"losses' largest relative difference {loss_difference:.1e}, weights' largest "
          f"difference {weight_difference:.1e}")
    assert loss_difference < 1e-6
    assert weight_difference < 1e-5  # 1% of what Adam (1e-3) moves a weight in one update


def kept_fraction_tolerance(keep, size):
    return 5 * math.sqrt(keep * (1 - keep) / size)


def test_byte_dropout_has_keras_dropouts_mask_distribution():
    layer = conv_vae.ByteDropout(0.25, seed=0)
    x = np.ones((64, 28, 28, 32), np.float32)
    first, second = (keras.ops.convert_to_numpy(layer(x, training=True)) for _ in range(2))
    kept = first != 0
    assert abs(kept.mean() - 0.75) < kept_fraction_tolerance(0.75, kept.size)
    np.testing.assert_allclose(first[kept], 1 / 0.75, rtol=1e-6)  # kept units scaled as Keras does
    for lane in kept.reshape(-1, 4).T:  # each byte of a random word is its own fair draw
        assert abs(lane.mean() - 0.75) < kept_fraction_tolerance(0.75, lane.size)
    both = kept & (second != 0)  # a fresh mask per call, independent of the last
    assert abs(both.mean() - 0.75**2) < kept_fraction_tolerance(0.75**2, both.size)
    np.testing.assert_array_equal(layer(x, training=False), x)


def test_byte_dropout_leaves_rates_bytes_cannot_express_to_keras():
    x = np.ones((64, 28, 28, 32), np.float32)
    kept = keras.ops.convert_to_numpy(conv_vae.ByteDropout(0.3, seed=0)(x, training=True)) != 0
    assert abs(kept.mean() - 0.7) < kept_fraction_tolerance(0.7, kept.size)


@pytest.mark.parametrize("args, message", [
    (["--filters", "0"], "--filters: must be a positive integer"),
    (["--dropout", "1.5"], "--dropout: must be in [0, 1)"),
    (["--dense-units", "0"], "--dense-units: must be a positive integer"),
    (["--data", "/nonexistent/mnist.npz"], "no such file or directory"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    result = run_main("conv_vae.py", *args, "--results-dir", tmp_path)
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert line.startswith("conv_vae.py: error:") and message in line
