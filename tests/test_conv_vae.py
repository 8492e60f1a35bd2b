"""conv_vae.py: the convolutional encoder/decoder on vae.py's pipeline, end to end."""

import argparse
import json
import math
import zipfile

import h5py
import keras
import numpy as np
import pytest
from conftest import QUICK, error_lines, run_main, shared_run

import conv_vae
import fid
import vae


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_mnist):
    return shared_run(tmp_path_factory, "conv_vae.py", "--data", tiny_mnist, *QUICK, "--filters", "8")


def test_run_writes_every_output(finished_run, tiny_mnist):
    from test_vae import check_finished_run

    results_dir, result = finished_run
    metrics = check_finished_run(results_dir, epochs=2)
    assert metrics["model"] == "Convolutional VAE" and metrics["config"]["filters"] == 8
    model = fid.load_model(results_dir / "model.keras")  # the numbers are the model's, to the digit
    x_test = vae.to_float_images(vae.load_dataset(tiny_mnist)[2])
    estimate = vae.importance_weighted_log_likelihood(model, x_test, 8, seed=0, xla=False, verbose=False)
    assert metrics["test_log_likelihood_iw"] == float(np.mean(estimate))
    assert not {"xla", "batches_per_step"} & metrics["config"].keys()  # command-line options only
    assert np.isfinite([metrics["fid_pixel_recon"], metrics["fid_pixel_samples"], metrics["test_log_likelihood_iw"]]).all()
    assert "Convolutional VAE: 2 epochs" in result.stdout


def test_saved_model_with_custom_layers_reproduces_its_reconstructions_with_dropout_off(finished_run, tiny_mnist):
    results_dir, _ = finished_run
    model = keras.models.load_model(results_dir / "model.keras")
    assert isinstance(model, vae.VAE) and isinstance(model.sampling, vae.Sampling)
    assert len(vae.random_states(model)) == 4  # sampling, binarization, two dropouts: a resume goes on with each
    x_test = vae.to_float_images(vae.load_dataset(tiny_mnist)[2])
    reconstructions, terms = vae.evaluate_elbo(model, x_test, seed=0)
    metrics = json.loads((results_dir / "metrics.json").read_text())
    assert float(-np.mean(sum(terms.values()))) == pytest.approx(metrics["test_elbo"], rel=1e-5)
    np.testing.assert_array_equal(reconstructions, vae.evaluate_elbo(fid.load_model(results_dir / "model.keras"),
                                                                     x_test, seed=0)[0])
    z_mean, _ = model.encoder(x_test[:16], training=False)  # dropout is off at inference only
    np.testing.assert_array_equal(z_mean, model.encoder(x_test[:16], training=False)[0])
    np.testing.assert_array_equal(model.decoder(z_mean, training=False), model.decoder(z_mean, training=False))
    assert not np.allclose(model.decoder(z_mean, training=True), model.decoder(z_mean, training=True))


@pytest.mark.parametrize("plain, conv, dropout", [(False, "Conv2D", "ByteDropout"), (True, "Conv2D", "Dropout")])
def test_architecture_matches_the_original(plain, conv, dropout):
    args = argparse.Namespace(latent_dim=2, filters=32, dense_units=32, dense_layers=1, dropout=0.25, plain=plain, activation="relu")
    encoder, decoder = conv_vae.conv_encoder(args, (28, 28, 1)), conv_vae.conv_decoder(args, (28, 28, 1))
    assert [layer.__class__.__name__ for layer in encoder.layers[1:]] == [
        conv, conv, dropout, "Flatten", "Dense", "Dense", "Dense"]
    assert encoder.layers[2].output.shape == (None, 7, 7, 64) and encoder.layers[5].units == 32
    assert [layer.__class__.__name__ for layer in decoder.layers[1:]] == [
        "Dense", "Reshape", *[f"{conv}Transpose"] * 2, dropout, f"{conv}Transpose", "Activation"]
    assert decoder.output.shape == (None, 28, 28, 1) and decoder.layers[-1].get_config()["activation"] == "sigmoid"
    vae.start_at_data_mean(decoder, np.full((3, 28, 28, 1), 0.2, np.float32))  # one bias: the images' mean
    np.testing.assert_allclose(keras.ops.sigmoid(decoder.layers[-2].bias), [0.2], rtol=1e-5)


def test_activation_dense_layers_and_a_label_after_the_convolutions_and_beside_z_reach_both_networks():
    args = argparse.Namespace(latent_dim=2, filters=4, dense_units=16, dense_layers=2, dropout=0.0, plain=False, activation="elu")
    hidden = [layer for network in (conv_vae.conv_encoder(args, (28, 28, 1)), conv_vae.conv_decoder(args, (28, 28, 1))) for layer in network.layers
              if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose, keras.layers.Dense)) and layer.name not in ("z_mean", "z_log_var")
              and not (isinstance(layer, keras.layers.Conv2DTranspose) and layer.filters == 1)]
    assert len(hidden) == 8 and {layer.get_config()["activation"] for layer in hidden} == {"elu"}
    assert [layer.units for layer in hidden if isinstance(layer, keras.layers.Dense)] == [16, 16, 16, 7 * 7 * 8]
    args.dense_layers, args.activation = 1, "relu"  # conditional networks: a label of 10 classes
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


def test_a_model_file_of_the_matrix_product_layers_loads_as_keras_layers(finished_run, tmp_path, tiny_mnist):
    """Model files saved when the convolutions had matrix-product forms name MatmulConv2D and
    MatmulConv2DTranspose, and file their weights under those names: they load, to the same
    outputs."""
    with zipfile.ZipFile(finished_run[0] / "model.keras") as saved:
        files = {name: saved.read(name) for name in saved.namelist()}
    renamed = []

    def rename(node):  # each object of config.json, as the old files name them
        if node.get("class_name") in ("Conv2D", "Conv2DTranspose"):
            name = f"Matmul{node['class_name']}"
            node.update(module=None, class_name=name, registered_name=f"mnist_vae>{name}")
            renamed.append(name)
        return node
    config = json.loads(files["config.json"], object_hook=rename)
    assert sorted(renamed) == ["MatmulConv2D"] * 2 + ["MatmulConv2DTranspose"] * 3
    weights = tmp_path / "model.weights.h5"
    weights.write_bytes(files["model.weights.h5"])
    with h5py.File(weights, "r+") as file:
        for network in ("encoder", "decoder"):
            for group in list(file[f"{network}/layers"]):
                if group.startswith("conv2d"):
                    file.move(f"{network}/layers/{group}", f"{network}/layers/matmul_{group}")
    files.update({"config.json": json.dumps(config).encode(), "model.weights.h5": weights.read_bytes()})
    with zipfile.ZipFile(tmp_path / "old.keras", "w") as old:
        for name, data in files.items():
            old.writestr(name, data)
    x_test = vae.to_float_images(vae.load_dataset(tiny_mnist)[2])
    expected = vae.evaluate_elbo(fid.load_model(finished_run[0] / "model.keras"), x_test, seed=0)[0]
    np.testing.assert_array_equal(vae.evaluate_elbo(fid.load_model(tmp_path / "old.keras"), x_test, seed=0)[0], expected)


def test_byte_dropout_has_keras_dropouts_mask_distribution_and_leaves_rates_bytes_cannot_express_to_keras():
    def kept_fraction_tolerance(keep, size):  # 5 standard deviations of a fraction kept of size draws
        return 5 * math.sqrt(keep * (1 - keep) / size)
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
    kept = keras.ops.convert_to_numpy(conv_vae.ByteDropout(0.3, seed=0)(x, training=True)) != 0  # Keras' draw
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
