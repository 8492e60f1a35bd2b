"""vae.py: data loading and its errors, the model's maths, the likelihood estimates, and whole runs."""

import argparse
import gzip
import json
import math
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import weakref
import zipfile
from pathlib import Path
from unittest.mock import Mock

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from conftest import QUICK, ROOT, error_lines, run_main, run_ok, shared_between_workers, shared_run, tiny_digits
from scipy.stats import multivariate_normal

import fid
import vae

IMAGE = (28, 28, 1)  # the tiny data's image shape


def dense_args(**changes):
    """vae.py's options at their defaults (its parser's), with changes."""
    return argparse.Namespace(**{**vars(vae.build_parser(vae.DENSE)[0].parse_args([])), **changes})


# ---- Data ----------------------------------------------------------------------------------------


def write_idx_folder(folder, npz, compress=False):
    folder.mkdir()
    with np.load(npz) as data:
        for key, name in vae.IDX_FILES.items():  # the magic number: unsigned bytes, in 3 or 1 dimensions
            header = b"".join(n.to_bytes(4, "big") for n in (0x803 if key.startswith("x") else 0x801, *data[key].shape))
            with (gzip.open if compress else open)(folder / (name + (".gz" if compress else "")), "wb") as file:
                file.write(header + data[key].astype(np.uint8).tobytes())
    return folder


def test_npz_loads_as_uint8_arrays_and_an_idx_folder_plain_or_gzipped_as_the_same(tiny_mnist, tmp_path):
    from_npz = x_train, y_train, x_test, y_test = vae.load_dataset(tiny_mnist)
    assert x_train.shape == (256, 28, 28) and x_test.shape == (64, 28, 28)
    assert x_train.dtype == np.uint8 and y_train.shape == (256,) and y_test.max() <= 9
    for compress in (False, True):
        folder = write_idx_folder(tmp_path / f"idx-{compress}", tiny_mnist, compress)
        for from_idx, expected in zip(vae.load_dataset(folder), from_npz):
            np.testing.assert_array_equal(from_idx, expected)


def corrupt(tmp_path, tiny_mnist, **replace):
    with np.load(tiny_mnist) as data:
        arrays = {key: replace.get(key, data[key]) for key in data.files}
    np.savez(tmp_path / "bad.npz", **{key: array for key, array in arrays.items() if array is not None})
    return tmp_path / "bad.npz"


@pytest.mark.parametrize("change, message", [
    (dict(x_train=None), "missing array(s) x_train"),
    (dict(x_test=np.zeros((64, 28, 27), np.uint8)), "shape (64, 28, 27), expected (N, 28, 28)"),
    (dict(x_train=np.zeros((256, 28, 28), np.float32)), "dtype float32"),
    (dict(y_test=np.full(64, 10)), "labels 0-9"),
    (dict(y_train=np.zeros(255, np.uint8)), "to match x_train"),
])
def test_bad_npz_is_a_one_line_usage_error(tmp_path, tiny_mnist, change, message):
    with pytest.raises(vae.UsageError, match="bad.npz") as error:
        vae.load_dataset(corrupt(tmp_path, tiny_mnist, **change))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_offline_download_names_the_dataset_and_data(monkeypatch):
    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", Mock(side_effect=OSError("no network")))
    with pytest.raises(vae.UsageError, match=r"cannot download Fashion-MNIST \(OSError: no network\); pass --data PATH"):
        vae.load_dataset(None, "fashion_mnist")


def test_fashion_mnist_runs_with_clothing_names_replacing_results_without_a_model(finished_run, tmp_path, tiny_mnist):
    """Figures and metrics alone (the examples committed in results/) are not a run to protect."""
    for name in ("metrics.json", "history.csv", "samples.png"):  # of an MNIST run of 2 epochs
        (tmp_path / name).write_bytes((finished_run[0] / name).read_bytes())
    result = run_ok("vae.py", "--data", tiny_mnist, "--results-dir", tmp_path, *QUICK, "--epochs", "1",
                    "--fid", "none", "--iw-samples", "0", "--dataset", "fashion_mnist")
    assert "holds results without a model or checkpoint; this run replaces them" in result.stdout
    assert check_finished_run(tmp_path, epochs=1)["config"]["dataset"] == "fashion_mnist"
    model = fid.load_model(tmp_path / "model.keras")
    x, labels = vae.to_float_images(vae.load_dataset(tiny_mnist)[2]), vae.load_dataset(tiny_mnist)[3]
    *_, row_labels = vae.interpolate(model, x, labels, vae.encode(model, x)[0], vae.DATASETS["fashion_mnist"][2])
    assert "T-shirt/top \N{RIGHTWARDS ARROW} Dress" in row_labels  # class 0 to class 3


@pytest.mark.parametrize("damage, message", [  # an absent or unreadable .npz: test_bad_paths_exit_2_before_training
    ("no labels", "missing t10k-labels-idx1-ubyte"), ("truncated", "header says shape"),
    ("magic", "magic number 0x0803"),
])
def test_unreadable_idx_files_are_usage_errors(tmp_path, tiny_mnist, damage, message):
    folder = write_idx_folder(tmp_path / "idx", tiny_mnist)
    images = folder / "train-images-idx3-ubyte"
    if damage == "no labels":
        (folder / "t10k-labels-idx1-ubyte").unlink()
    elif damage in ("truncated", "magic"):
        good = images.read_bytes()
        images.write_bytes(good[:-100] if damage == "truncated" else b"\x00\x00\x08\x01" + good[4:])
    with pytest.raises(vae.UsageError, match=message):
        vae.load_dataset(folder)


# ---- Model maths ---------------------------------------------------------------------------------


def test_sampling_has_the_posterior_mean_and_variance():
    z_mean = np.full((200_000, 2), [1.5, -2.0], np.float32)
    z_log_var = np.full((200_000, 2), np.log([0.25, 4.0]), np.float32)
    z = keras.ops.convert_to_numpy(vae.Sampling(seed=3)([z_mean, z_log_var]))
    np.testing.assert_allclose(z.mean(axis=0), [1.5, -2.0], atol=0.02)
    np.testing.assert_allclose(z.var(axis=0), [0.25, 4.0], rtol=0.02)


def test_loss_terms_match_hand_computed_values_and_the_gaussian_constant_makes_a_density():
    x = np.array([[0.0, 0.5, 1.0, 0.25]], np.float32)
    x_hat = np.array([[0.1, 0.5, 0.8, 0.5]], np.float32)
    squared = 0.1**2 + 0 + 0.2**2 + 0.25**2
    assert float(vae.reconstruction_error(x, x_hat, "gaussian")[0]) == pytest.approx(squared, rel=1e-6)
    assert squared == pytest.approx(4 * np.mean((x - x_hat) ** 2))  # the original's 784 * MSE, for 4 pixels
    cross_entropy = -(np.log(0.9) + 0.5 * np.log(0.5) * 2 + np.log(0.8) + 0.25 * np.log(0.5) + 0.75 * np.log(0.5))
    assert float(vae.reconstruction_error(x, x_hat, "bernoulli")[0]) == pytest.approx(cross_entropy, rel=1e-5)
    z_mean, z_log_var = np.array([[1.0, -2.0]], np.float32), np.array([[0.0, math.log(0.5)]], np.float32)
    kl = 0.5 * ((1 + 0 - 1) * 0 + 1**2) + 0.5 * (0.5 + 4.0 - 1 - math.log(0.5))
    assert float(vae.kl_divergence(z_mean, z_log_var)[0]) == pytest.approx(kl, rel=1e-6)
    assert vae.log_likelihood_constant(784, "gaussian") == pytest.approx(392 * math.log(math.pi))
    x, x_hat = np.array([0.3, 0.9]), np.array([0.5, 0.4])  # the squared error and constant: -log N(x; x_hat, I/2)
    exact = -np.sum(np.log(multivariate_normal(x_hat, 0.5 * np.eye(2)).pdf(x)))
    nll = np.sum((x - x_hat) ** 2) + vae.log_likelihood_constant(2, "gaussian")
    assert nll == pytest.approx(exact)
    assert vae.log_likelihood_constant(784, "bernoulli") == 0


def test_a_regulariser_trains_but_stays_out_of_the_elbo(monkeypatch):
    """A term outside ELBO_TERMS (here an L2 penalty on the posterior means) joins the training
    loss, its logs and the test metrics, but the test ELBO stays the model's."""
    args = argparse.Namespace(latent_dim=2, hidden_dim=8, hidden_layers=1, activation="relu")
    model = vae.VAE(vae.dense_encoder(args, IMAGE), vae.dense_decoder(args, IMAGE), seed=0)
    x = np.random.default_rng(0).random((8, 28, 28, 1)).astype(np.float32)
    _, terms = vae.evaluate_elbo(model, x, seed=0)
    monkeypatch.setitem(vae.LOSS_TERMS, "l2", lambda x, x_hat, z_mean, z_log_var, likelihood:
                        5.0 * keras.ops.sum(keras.ops.square(z_mean), axis=-1))
    model = vae.VAE(model.encoder, model.decoder, seed=0)
    batch_terms = model.loss_terms(x, None, training=False)
    assert set(batch_terms) == {"reconstruction", "kl", "l2"} and float(batch_terms["l2"]) > 0
    assert float(vae.weighted_sum(batch_terms, 1.0)) == pytest.approx(
        sum(float(value) for value in batch_terms.values()), rel=1e-6)
    model.track(batch_terms, 1.0)
    assert set(model.logs()) == {"loss", "reconstruction_loss", "kl_loss", "l2_loss"}
    _, regularised = vae.evaluate_elbo(model, x, seed=0)
    assert np.all(regularised["l2"] > 0)
    for name in vae.ELBO_TERMS:
        np.testing.assert_array_equal(regularised[name], terms[name])


def test_active_units_and_kl_per_dimension_tell_a_collapsed_dimension_from_a_used_one():
    """Burda et al.'s active units: a dimension whose posterior is the prior for every image (its
    mean and log-variance weights zero, and the decoder's weights from it zero: the decoder
    ignores it) is inactive with a KL of 0; a dimension that encodes the images is active."""
    args = argparse.Namespace(latent_dim=2, hidden_dim=16, hidden_layers=1, activation="relu")
    model = vae.VAE(vae.dense_encoder(args, IMAGE), vae.dense_decoder(args, IMAGE), seed=0)
    x = vae.to_float_images(tiny_digits(200, np.random.default_rng(0))[0])
    kernel, bias = model.encoder.get_layer("z_mean").get_weights()  # means that vary well above
    model.encoder.get_layer("z_mean").set_weights([10 * kernel, bias])  # the threshold, any init
    used = vae.latent_usage(*vae.encode(model, x))
    assert used["active_units"] == 2 and min(used["kl_per_dimension"]) > 0
    for name in ("z_mean", "z_log_var"):
        kernel, bias = model.encoder.get_layer(name).get_weights()
        kernel[:, 1], bias[1] = 0, 0
        model.encoder.get_layer(name).set_weights([kernel, bias])
    first = model.decoder.layers[1]
    kernel, bias = first.get_weights()
    kernel[1] = 0
    first.set_weights([kernel, bias])
    collapsed = vae.latent_usage(*vae.encode(model, x))
    assert collapsed["active_units"] == 1 and collapsed["kl_per_dimension"][1] == 0.0
    assert collapsed["kl_per_dimension"][0] == pytest.approx(used["kl_per_dimension"][0], rel=1e-6)
    z_mean, z_log_var = vae.encode(model, x)
    total = float(np.mean(keras.ops.convert_to_numpy(vae.kl_divergence(z_mean, z_log_var))))
    assert sum(collapsed["kl_per_dimension"]) == pytest.approx(total, rel=1e-5)  # the KL, split by dimension


@pytest.mark.parametrize("xla", [False, True])
def test_dynamic_binarization_draws_bernoulli_pixels_afresh_at_each_call(xla):
    generator = keras.random.SeedGenerator(0)
    x = np.tile(np.linspace(0, 1, 11, dtype=np.float32), (20_000, 1))
    draw = tf.function(lambda x: vae.bernoulli_pixels(x, generator, xla), jit_compile=xla)
    first, second = (draw(x).numpy() for _ in range(2))
    np.testing.assert_allclose(first.mean(axis=0), x[0], atol=5 * 0.5 / math.sqrt(20_000))
    assert first[:, 0].max() == 0 and first[:, -1].min() == 1 and not np.array_equal(first, second)


def test_burdas_schedule_adam_settings_and_progress_frames():
    """Burda et al. (2016): stage i (from 0) of 3^i epochs at 10^(1 - i/7) / 10 of the rate, as
    their code rounds it; their Adam (optimizers.py: beta_1, epsilon, second moments from 1), whose
    first step is theirs. Their 3,280 epochs keep a progress frame each epoch to 99, then every
    10th, then every 100th."""
    args = dense_args(hidden_dim=8, activation="tanh", lr_schedule="burda", adam_beta_1=0.99, adam_epsilon=1e-4,
                      adam_second_moment_init=1.0)
    model = vae.VAE(vae.dense_encoder(args, IMAGE), vae.dense_decoder(args, IMAGE), updates_per_epoch=5)
    vae.compile_model(model, args, xla=False)
    before = model.trainable_weights[0].numpy()
    model.optimizer.apply([keras.ops.full_like(w, 0.5) for w in model.trainable_weights], model.trainable_weights)
    m, v = 0.01 * 0.5, 0.999 * 1.0 + 0.001 * 0.5**2  # their moments after the first gradient, 0.5
    step = 1e-3 * math.sqrt(1 - 0.999) / (1 - 0.99) * m / (math.sqrt(v) + 1e-4)
    np.testing.assert_allclose(before - model.trainable_weights[0].numpy(), step, rtol=5e-3)  # float32 weights
    rates = []
    for epoch in (0, 1, 3, 4, 12, 13, 1092, 1093, 3279):
        model.optimizer.iterations.assign(5 * epoch)
        rates.append(float(model.optimizer.learning_rate))
    assert rates == pytest.approx([1e-3, 7.2e-4, 7.2e-4, 5.2e-4, 5.2e-4, 3.7e-4, 1.4e-4, 1e-4, 1e-4], rel=1e-6)
    assert (model.optimizer.beta_1, model.optimizer.epsilon) == (0.99, 1e-4)
    epochs = vae.framed_epochs(3280)
    assert epochs[:99] == list(range(1, 100)) and epochs[99:101] == [100, 110]
    assert epochs[-3:] == [3000, 3100, 3200] and len(epochs) == 212


def test_output_bias_data_mean_starts_the_decoder_at_the_training_images_mean():
    """Burda et al.'s initialisation: with its last kernel at zero the decoder draws each pixel's
    training mean, a pixel never on at 0.001 (a finite logit)."""
    x = np.random.default_rng(0).uniform(size=(50, *IMAGE)).astype(np.float32)
    x[:, 0, 0] = 0
    args = argparse.Namespace(latent_dim=2, hidden_dim=8, hidden_layers=1, activation="tanh")
    decoder = vae.dense_decoder(args, IMAGE)
    vae.start_at_data_mean(decoder, x)
    decoder.layers[-2].kernel.assign(np.zeros(decoder.layers[-2].kernel.shape))
    expected = np.clip(x.mean(axis=0), 0.001, 0.999)
    np.testing.assert_allclose(decoder(np.zeros((1, 2))).numpy()[0], expected, rtol=1e-5)


def test_binarize_once_draws_bernoulli_pixels():
    x = np.full((100, 28, 28, 1), 0.3, np.float32)
    binary = vae.binarize_once(x, seed=0)
    assert set(np.unique(binary)) == {0.0, 1.0}
    assert binary.mean() == pytest.approx(0.3, abs=0.005)
    np.testing.assert_array_equal(binary, vae.binarize_once(x, seed=0))


# ---- The fast training path: same batches, same updates ------------------------------------------


def test_fast_path_holds_each_image_once_per_epoch_in_a_fresh_seeded_order_and_trains_as_single_batches(tiny_mnist):
    x = np.arange(70, dtype=np.float32)[:, None, None, None] * np.ones((1, 28, 28, 1), np.float32)
    train, _, groups_per_epoch = vae.make_datasets(x, x[:10], batch_size=8, batches_per_step=3, seed=0)
    assert groups_per_epoch == 4  # 70 images = 8 full batches in groups of 3, 3, 2, then the last 6 alone
    groups = [group.numpy() for group in train.take(2 * groups_per_epoch)]
    assert [group.shape for group in groups[:4]] == [(3, 8, 28, 28, 1), (3, 8, 28, 28, 1), (2, 8, 28, 28, 1),
                                                     (1, 6, 28, 28, 1)]
    orders = [np.concatenate([group[..., 0, 0, 0].ravel() for group in groups[4 * e:4 * e + 4]]) for e in (0, 1)]
    assert [sorted(order) for order in orders] == [list(range(70))] * 2
    assert not np.array_equal(orders[0], orders[1])
    again = [group.numpy() for group in vae.make_datasets(x, x[:10], 8, 3, 0)[0].take(4)]  # its seed, its order
    np.testing.assert_array_equal(np.concatenate([g[..., 0, 0, 0].ravel() for g in again]), orders[0])
    x = vae.to_float_images(vae.load_dataset(tiny_mnist)[0][:100])
    weights, updates = [], []
    # Graph steps, not XLA (which draws other random numbers, and takes ten seconds to compile
    # here): test_real_mnist_run trains grouped XLA steps.
    for batches_per_step in (1, 4):
        args = dense_args(batch_size=16, hidden_dim=32)
        keras.utils.set_random_seed(0)
        model = vae.VAE(vae.dense_encoder(args, IMAGE), vae.dense_decoder(args, IMAGE), seed=0)
        vae.compile_model(model, args, xla=False)
        train, _, groups_per_epoch = vae.make_datasets(x, x, args.batch_size, batches_per_step, args.seed)
        model.fit(train, steps_per_epoch=groups_per_epoch, epochs=2, shuffle=False, verbose=0)
        weights.append(model.get_weights())
        updates.append(int(model.optimizer.iterations))
    assert updates == [2 * 7, 2 * 7]  # 100 images in batches of 16: 6 full and one of 4, per epoch
    for grouped, single in zip(*weights):
        np.testing.assert_allclose(grouped, single, rtol=1e-5, atol=1e-6)


def test_hidden_layers_and_activation_shape_both_networks():
    args = argparse.Namespace(latent_dim=2, hidden_dim=16, hidden_layers=3, activation="gelu")
    encoder, decoder = vae.dense_encoder(args, IMAGE), vae.dense_decoder(args, IMAGE)
    hidden = [layer for network in (encoder, decoder) for layer in network.layers
              if isinstance(layer, keras.layers.Dense) and layer.units == 16]
    assert len(hidden) == 6 and {layer.get_config()["activation"] for layer in hidden} == {"gelu"}
    assert decoder.layers[-2].units == 784 and decoder.layers[-2].get_config()["activation"] == "sigmoid"
    assert [layer.name for layer in encoder.layers[-2:]] == ["z_mean", "z_log_var"]


def interrupt_after_epochs(monkeypatch, epochs, interrupt=Mock(side_effect=KeyboardInterrupt)):
    """interrupt() (Ctrl-C) right after the run has committed the checkpoint of `epochs` epochs, in
    this process: the state a kill leaves (a kill of a real process: test_interrupted_run_...)."""
    on_epoch_end = vae.RunCallback.on_epoch_end

    def on_epoch_end_then_interrupt(self, epoch, logs=None):
        on_epoch_end(self, epoch, logs)
        if self.epochs_done == epochs:
            interrupt()
    monkeypatch.setattr(vae.RunCallback, "on_epoch_end", on_epoch_end_then_interrupt)


def test_an_interrupt_python_swallowed_still_stops_the_run_at_the_next_batch(tmp_path, tiny_mnist, monkeypatch):
    swallowed = []  # what Python hands sys.unraisablehook instead of raising
    monkeypatch.setattr(sys, "unraisablehook", swallowed.append)

    def interrupt_in_a_weakref_callback():
        owner = type("Owner", (), {})()
        reference = weakref.ref(owner, lambda _: vae.interrupt(signal.SIGINT, None))
        del owner  # the callback runs here; its KeyboardInterrupt goes to unraisablehook
        assert reference() is None
    interrupt_after_epochs(monkeypatch, 1, interrupt_in_a_weakref_callback)
    interrupted = run_main("vae.py", "--data", tiny_mnist, "--results-dir", tmp_path, *QUICK, "--epochs", "3",
                           "--fid", "none")
    assert [type(hook.exc_value) for hook in swallowed] == [KeyboardInterrupt]
    assert interrupted.returncode == 130 and "1 complete epoch checkpointed" in interrupted.stdout
    assert json.loads((tmp_path / "checkpoint.json").read_text())["epochs_done"] == 1
    vae.INTERRUPTED.clear()


def test_cosine_schedule_survives_an_interrupt_and_resume_and_cannot_be_extended(tmp_path, tiny_mnist, monkeypatch):
    common = ["--data", str(tiny_mnist), "--results-dir", str(tmp_path), "--epochs", "10", "--batch-size", "16",
              "--fid", "none", "--iw-samples", "0", "--lr-schedule", "cosine"]
    with monkeypatch.context() as patch:
        interrupt_after_epochs(patch, 2)
        interrupted = run_main("vae.py", *common)
    assert interrupted.returncode == 130  # the command to paste: interpreter, every option, --resume
    assert f"resume with: {shlex.join([sys.executable, 'vae.py', *common, '--resume'])}\n" in interrupted.stdout
    assert not (tmp_path / "model.keras").exists()
    state = json.loads((tmp_path / "checkpoint.json").read_text())
    checkpoint = fid.load_model(tmp_path / state["model_file"])
    rate = float(checkpoint.optimizer.learning_rate)
    assert state["epochs_done"] == 2 and 0 < rate < 1e-3  # part way down the cosine, not back at the constant rate
    run_ok("vae.py", *common, "--resume")
    final = fid.load_model(tmp_path / "model.keras")
    assert int(final.optimizer.iterations) == 10 * final.updates_per_epoch
    assert float(final.optimizer.learning_rate) == pytest.approx(0.0, abs=1e-12)  # the schedule ran to its end
    refused = run_main("vae.py", *common[:4], "--epochs", "50", "--resume")
    assert refused.returncode == 2
    assert "schedule ends at epoch 10; resume with --epochs 10" in error_lines(refused.stderr)[0]


# ---- Likelihood estimates, on a model whose marginal likelihood is known exactly: ----------------
# z ~ N(0, I), x | z ~ N(W z + b, 1/2 I)  =>  p(x) = N(b, W W^T + 1/2 I)

LATENT, PIXELS = 2, 5


def linear_gaussian_vae(variance_scale):
    """Decoder W z + b; encoder: the exact posterior mean with its variance scaled, so q != p(z|x).
    Returns the model, 20 images and their exact density p(x)."""
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(PIXELS, LATENT)), rng.normal(size=PIXELS)
    posterior_cov = np.linalg.inv(np.eye(LATENT) + w.T @ w / 0.5)
    gain = posterior_cov @ w.T / 0.5  # posterior mean = gain @ (x - b)
    x_in = keras.Input((PIXELS,))
    z_mean = keras.layers.Dense(LATENT)(x_in)
    z_log_var = keras.layers.Dense(LATENT)(x_in)
    encoder = keras.Model(x_in, [z_mean, z_log_var])
    encoder.layers[1].set_weights([gain.T, -gain @ b])
    encoder.layers[2].set_weights([np.zeros((PIXELS, LATENT)), np.log(variance_scale * np.diag(posterior_cov))])
    z_in = keras.Input((LATENT,))
    decoder = keras.Model(z_in, keras.layers.Dense(PIXELS)(z_in))
    decoder.layers[1].set_weights([w.T, b])
    x = rng.normal(size=(20, PIXELS)).astype(np.float32) + b.astype(np.float32)
    density = multivariate_normal(b, w @ w.T + 0.5 * np.eye(PIXELS))
    return vae.VAE(encoder, decoder, likelihood="gaussian", seed=0), x, density


def test_importance_weighted_estimate_converges_to_the_exact_likelihood_and_is_stable_far_from_it():
    model, x, density = linear_gaussian_vae(variance_scale=3.0)
    exact = density.logpdf(x)
    _, terms = vae.evaluate_elbo(model, np.repeat(x, 200, axis=0), seed=0)
    elbo = -(terms["reconstruction"] + terms["kl"]).reshape(len(x), 200).mean(axis=1)
    repeats = {1: 400, 10: 100, 100: 20, 5000: 1}  # averaged over repeats: the expected estimate for each K
    estimates = {k: vae.importance_weighted_log_likelihood(model, np.repeat(x, r, axis=0), k, seed=1, verbose=False)
                 .reshape(len(x), r).mean(axis=1) for k, r in repeats.items()}
    gaps = {k: np.mean(exact - estimate) for k, estimate in estimates.items()}
    assert np.all(elbo < exact)
    assert gaps[1] > gaps[10] > gaps[100] > gaps[5000] > -0.01  # tighter with K, never above log p(x)
    assert gaps[1] == pytest.approx(np.mean(exact - elbo), rel=0.1)  # K=1 is the ELBO
    np.testing.assert_allclose(estimates[5000], exact, atol=0.08)
    assert abs(gaps[5000]) < 0.01
    # Images far from the model put log-weights near -1e6: log-sum-exp must not underflow to -inf.
    far = vae.importance_weighted_log_likelihood(model, x + 1000.0, 100, seed=0, verbose=False)
    assert np.all(np.isfinite(far)) and np.all(far < -1e4)
    np.testing.assert_allclose(far, density.logpdf(x + 1000.0), rtol=1e-3)


def test_interpolation_runs_between_posterior_means_of_different_classes():
    args = argparse.Namespace(latent_dim=3, hidden_dim=8, hidden_layers=1, activation="relu")
    model = vae.VAE(vae.dense_encoder(args, IMAGE), vae.dense_decoder(args, IMAGE))
    labels = np.array([5, 0, 3, 3, 8, 1, 4])
    x = np.random.default_rng(0).random((7, 28, 28, 1)).astype(np.float32)
    z_mean = np.random.default_rng(1).standard_normal((7, 3)).astype(np.float32)
    starts, paths, ends, row_labels = vae.interpolate(model, x, labels, z_mean, tuple("0123456789"), steps=5)
    arrow = " \N{RIGHTWARDS ARROW} "
    assert row_labels == [f"0{arrow}3", f"1{arrow}4", f"5{arrow}8", f"8{arrow}1"]  # no 6 or 7: 3 and 4 have no pair
    np.testing.assert_array_equal(starts, x[[1, 5, 0, 4]])  # the first image of each class
    np.testing.assert_array_equal(ends, x[[2, 6, 4, 5]])
    assert paths.shape == (4, 5, 28, 28, 1)
    np.testing.assert_allclose(paths[:, 0], vae.decode(model, z_mean[[1, 5, 0, 4]]), atol=1e-6)  # t = 0: the start's mean
    np.testing.assert_allclose(paths[:, -1], vae.decode(model, z_mean[[2, 6, 4, 5]]), atol=1e-6)


def test_chunking_does_not_change_the_estimate():
    model, x, _ = linear_gaussian_vae(variance_scale=2.0)
    whole = vae.importance_weighted_log_likelihood(model, x, 64, seed=5, verbose=False)
    chunked = vae.importance_weighted_log_likelihood(model, x, 64, seed=5, images_per_batch=20,
                                                     samples_per_chunk=64, verbose=False)
    pieces = vae.importance_weighted_log_likelihood(model, x, 64, seed=5, images_per_batch=20,
                                                    samples_per_chunk=64, xla=False, verbose=False)
    bounded = vae.importance_weighted_log_likelihood(model, x, 64, seed=5, images_per_batch=10, samples_per_chunk=64,
                                                     verbose=False, decoder_memory=4 * 64 * 4 * (PIXELS + PIXELS))
    np.testing.assert_allclose(whole, chunked, rtol=1e-5)
    np.testing.assert_allclose(chunked, pieces, rtol=1e-5)
    np.testing.assert_allclose(whole, bounded, rtol=1e-5)  # 4 images per call (a decode's layer
    # output and the output again: 4 * (5 + 5) bytes): each batch of 10 as 4 + 4 + 2


# ---- beta and KL warm-up -------------------------------------------------------------------------


def test_kl_weight_rises_linearly_over_the_warmup_epochs_then_stays_at_beta():
    args = argparse.Namespace(latent_dim=2, hidden_dim=8, hidden_layers=1, activation="relu")
    model = vae.VAE(vae.dense_encoder(args, IMAGE), vae.dense_decoder(args, IMAGE), beta=4.0, kl_warmup_epochs=2, updates_per_epoch=7)
    weights = [float(model.kl_weight(updates)) for updates in (0, 6, 7, 13, 14, 1000)]
    assert weights == [0.0, 0.0, 2.0, 2.0, 4.0, 4.0]
    assert vae.VAE(vae.dense_encoder(args, IMAGE), vae.dense_decoder(args, IMAGE), beta=0.5).kl_weight(123) == 0.5
    x = np.random.default_rng(0).random((8, 28, 28, 1)).astype(np.float32)
    terms = model.loss_terms(x, None, training=False)
    total = vae.weighted_sum(terms, 3.0)
    assert float(total) == pytest.approx(float(terms["reconstruction"]) + 3.0 * float(terms["kl"]), rel=1e-6)


@pytest.fixture(scope="session")
def warmup_runs(tmp_path_factory, tiny_mnist):
    """A run with KL warm-up and TensorBoard logs, trained 1 epoch then resumed to 3, and the same
    run trained 3 epochs unbroken, made once per session: the folder of both."""
    common = ["--data", tiny_mnist, *QUICK, "--fid", "pixel", "--iw-samples", "4", "--beta", "4",
              "--kl-warmup-epochs", "2", "--tensorboard"]
    unevaluated = ["--fid", "none", "--iw-samples", "0"]
    with shared_between_workers(tmp_path_factory, "warmup-runs") as shared:
        if not (shared / "unbroken" / "metrics.json").is_file():
            for name, epochs, last in (("resumed", "1", unevaluated), ("resumed", "3", ["--resume"]),
                                       ("unbroken", "3", unevaluated)):
                run_ok("vae.py", *common, "--results-dir", shared / name, "--epochs", epochs, *last)
        runs = tmp_path_factory.mktemp("warmup")
        for name in ("resumed", "unbroken"):
            shutil.copytree(shared / name, runs / name)
    return runs


def tensorboard_steps(log_dir):
    """{(run, tag): [steps]} of every summary in every event file under log_dir."""
    steps = {}
    for path in sorted(log_dir.rglob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                steps.setdefault((path.parent.name, value.tag), []).append(event.step)
    return steps


def test_warmup_and_tensorboard_logs_continue_exactly_across_a_resume_and_the_elbo_stays_unweighted(warmup_runs):
    tmp_path = warmup_runs
    histories = [json.loads((tmp_path / name / "checkpoint.json").read_text())["history"] for name in ("resumed", "unbroken")]
    assert histories[0] == histories[1]
    assert histories[0]["kl_weight"] == histories[0]["val_kl_weight"] == [0.0, 2.0, 4.0]
    header = (tmp_path / "resumed" / "history.csv").read_text().splitlines()[0].split(",")
    assert "kl_weight" in header and "val_kl_weight" in header
    metrics = check_finished_run(tmp_path / "resumed", epochs=3)
    assert metrics["config"]["beta"] == 4.0 and metrics["config"]["kl_warmup_epochs"] == 2
    assert metrics["test_elbo"] == pytest.approx(-(metrics["test_reconstruction"] + metrics["test_kl"]))
    last = {key: values[-1] for key, values in histories[0].items()}
    assert last["loss"] == pytest.approx(last["reconstruction_loss"] + 4.0 * last["kl_loss"], rel=1e-4)
    steps = tensorboard_steps(tmp_path / "resumed" / "tensorboard")  # each epoch's summaries once, none twice
    for key in (("train", "epoch_loss"), ("train", "epoch_kl_loss"), ("validation", "epoch_reconstruction_loss"),
                ("progress", "progress")):
        assert steps[key] == [0, 1, 2], key


# ---- Mixed precision -----------------------------------------------------------------------------


def dense_model(policy, likelihood="gaussian"):
    args = dense_args(hidden_dim=64, likelihood=likelihood, dtype_policy=policy)
    model = vae.build_model(args, vae.DENSE, IMAGE)
    model(np.zeros((1, 28, 28, 1), np.float32))
    vae.compile_model(model, args, xla=False)
    return model


@pytest.mark.parametrize("policy", vae.DTYPE_POLICIES)
def test_every_dtype_policy_keeps_variables_and_loss_in_float32(policy):
    model = dense_model(policy, likelihood="bernoulli")
    assert keras.config.dtype_policy().name == "float32"  # nothing built later (the FID classifier) inherits it
    hidden = model.decoder.layers[1]
    assert hidden.compute_dtype == ("float32" if policy == "float32" else policy.removeprefix("mixed_"))
    assert {keras.backend.standardize_dtype(v.dtype) for v in model.trainable_variables} == {"float32"}
    x = np.random.default_rng(0).random((32, 28, 28, 1)).astype(np.float32)
    z_mean, z_log_var = model.encoder(x)
    terms = model.loss_terms(x, None, training=True)
    outputs = (z_mean, z_log_var, model.decoder(z_mean), vae.weighted_sum(terms, 1.0), *terms.values())
    assert {keras.backend.standardize_dtype(t.dtype) for t in outputs} == {"float32"}
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == (policy == "mixed_float16")
    before = [w.copy() for w in model.get_weights()]
    logs = model.train_on_batch(x, return_dict=True)
    assert math.isfinite(logs["loss"]) and not np.array_equal(before[0], model.get_weights()[0])


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_16_bit_policies_compute_the_float32_loss_to_within_a_percent(policy):
    reference, model = dense_model("float32"), dense_model(policy)
    model.set_weights(reference.get_weights())
    x = vae.to_float_images(tiny_digits(64, np.random.default_rng(1))[0])
    exact_terms, low_terms = (network.loss_terms(x, None, training=False) for network in (reference, model))
    for exact, low in zip(exact_terms.values(), low_terms.values()):
        assert float(low) == pytest.approx(float(exact), rel=0.01)


def test_dtype_policy_is_saved_with_the_run_and_kept_on_resume(tmp_path, tiny_mnist):
    common = ["--data", tiny_mnist, *QUICK, "--fid", "none", "--iw-samples", "0"]
    results_dir = tmp_path / "resumed"
    run_ok("vae.py", *common, "--results-dir", results_dir, "--epochs", "1", "--dtype-policy", "mixed_bfloat16")
    assert json.loads((results_dir / "checkpoint.json").read_text())["config"]["dtype_policy"] == "mixed_bfloat16"
    refused = run_main("vae.py", *common, "--results-dir", results_dir, "--epochs", "2", "--resume",
                         "--dtype-policy", "mixed_float16")
    assert refused.returncode == 2 and "--dtype_policy" not in refused.stderr
    assert "--dtype-policy mixed_float16 differs from the checkpointed run's mixed_bfloat16" in error_lines(refused.stderr)[0]
    run_ok("vae.py", *common, "--results-dir", results_dir, "--epochs", "2", "--resume")
    metrics = check_finished_run(results_dir, epochs=2)
    assert metrics["config"]["dtype_policy"] == "mixed_bfloat16"
    model = fid.load_model(results_dir / "model.keras")
    assert model.dtype_policy.name == "mixed_bfloat16" and model.decoder.layers[1].compute_dtype == "bfloat16"
    run_ok("vae.py", *common, "--results-dir", tmp_path / "unbroken", "--epochs", "2",
           "--dtype-policy", "mixed_bfloat16")
    assert (json.loads((results_dir / "checkpoint.json").read_text())["history"]
            == json.loads((tmp_path / "unbroken" / "checkpoint.json").read_text())["history"])
    run_ok("vae.py", *common, "--results-dir", tmp_path / "other", "--evaluate-only", "--model",
           results_dir / "model.keras")
    again = json.loads((tmp_path / "other" / "metrics.json").read_text())
    assert again["config"]["dtype_policy"] == "mixed_bfloat16" and again["test_elbo"] == metrics["test_elbo"]


def test_the_machine_record_names_the_cpu_kind_and_a_kernel_cap(monkeypatch):
    """float32 digits repeat within a CPU kind, so every metrics.json names it."""
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    kind = "amx" if " amx_bf16" in flags else "avx512" if " avx512f" in flags else "avx2"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    record = vae.machine_record()
    assert record["isa"] == kind and record["onednn_max_cpu_isa"] == "AVX2" and record["cores"] >= 1


# ---- Command line: bad input fails in seconds with one line and exit code 2 ----------------------


@pytest.mark.parametrize("args, message", [
    (["--latent-dim", "0"], "--latent-dim: must be a positive integer"),
    (["--epochs", "0"], "--epochs: must be a positive integer"),
    (["--batch-size", "-3"], "--batch-size: must be a positive integer"),
    (["--learning-rate", "0"], "--learning-rate: must be a positive number"),
    (["--learning-rate", "nan"], "--learning-rate: must be a positive number"),
    (["--epochs", "ten"], "invalid positive_int value"),
    (["--model", "x.keras"], "--model goes with --evaluate-only"),
    (["--resume", "--overwrite"], "choose one of"),
    (["--hidden-layers", "0"], "--hidden-layers: must be a positive integer"),
    (["--activation", "sigmoid"], "--activation: invalid choice: 'sigmoid'"),
    (["--lr-schedule", "step"], "--lr-schedule: invalid choice: 'step'"),
    (["--fid", "pixel,fancy"], "unknown FID 'fancy': give none, all, or a comma-separated subset of pixel,classifier,inception"),
    (["--epoch", "3"], "unrecognized arguments: --epoch 3 (did you mean --epochs?)"),  # no abbreviations
    (["--latnet-dim", "2"], "unrecognized arguments: --latnet-dim 2 (did you mean --latent-dim?)"),
])
def test_invalid_arguments_exit_2_with_one_line(args, message):
    result = run_main("vae.py", *args)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_bad_paths_exit_2_before_training(capsys, tmp_path, tiny_mnist):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    out = tmp_path / "out"
    cases = [
        (["--data", tmp_path / "absent.npz", "--results-dir", out], "absent.npz: no such file"),
        (["--data", tmp_path / "bad.npz", "--results-dir", out], f"{tmp_path / 'bad.npz'}: not a readable .npz"),
        (["--data", tiny_mnist, "--results-dir", blocker / "sub"], "not writable"),
        (["--data", tiny_mnist, "--results-dir", out, "--fid", "inception", "--inception-weights", tmp_path / "no.h5"],
         "--inception-weights"),
        (["--data", tiny_mnist, "--results-dir", out, "--evaluate-only"], "no saved model to evaluate"),
        (["--data", tiny_mnist, "--results-dir", out, "--resume"], "no checkpoint to resume from"),
    ]
    for args, message in cases:
        assert vae.main(list(map(str, args))) == 2
        stderr = capsys.readouterr().err
        assert len(stderr.strip().splitlines()) == 1 and message in stderr, stderr
        assert not out.exists(), "a refused run left its results directory behind"


@pytest.mark.parametrize("script, change, message", [
    ("vae.py", dict(side=5), "the classifier FID needs images of at least 10x10 pixels, got 5x5: leave classifier out of --fid"),
    ("conv_vae.py", dict(side=30), "conv_vae.py needs image sides that are multiples of 4, got 30x30 images"),
    ("vae.py", dict(test=1), "the test set holds 1 image; --fid pixel,classifier needs at least 6 (--test-size"),
    ("vae.py", dict(test=1, args=["--fid", "none"]), "the test set holds 1 image; the evaluation needs at least 2"),
    ("vae.py", dict(args=["--fid-samples", "1"]), "--fid-samples 1: --fid pixel,classifier needs at least 6 prior samples"),
    ("vae.py", dict(args=["--fid-samples", "1", "--fid", "pixel"]), "--fid-samples 1: --fid pixel needs at least 2 prior samples"),
])
def test_what_the_evaluation_cannot_do_is_refused_before_training(tmp_path, script, change, message):
    """Image sizes, test-set and sample counts that the model or a metric cannot take: one line,
    exit 2, before the first epoch, and nothing left on disk."""
    side, test = change.get("side", 28), change.get("test", 16)
    images = np.random.default_rng(0).integers(0, 256, (16 + test, side, side), dtype=np.uint8)
    np.savez(tmp_path / "data.npz", x_train=images[:16], y_train=np.arange(16) % 10,
             x_test=images[16:], y_test=np.arange(test) % 10)
    out = tmp_path / "new" / "run"
    result = run_main(script, "--data", tmp_path / "data.npz", "--results-dir", out, "--epochs", "1",
                      *change.get("args", []))
    [line] = error_lines(result.stderr)
    assert result.returncode == 2 and line.startswith(f"{script}: error: {message}") and "Epoch" not in result.stdout
    assert not (tmp_path / "new").exists()


def test_a_run_prints_no_tensorflow_startup_lines(tmp_path, tiny_mnist):
    """A new process is the point: TensorFlow prints them at its first import and device start."""
    from test_fid import TENSORFLOW_STARTUP

    result = subprocess.run([sys.executable, "vae.py", "--data", tiny_mnist, "--results-dir", tmp_path, "--epochs", "1",
                             "--fid", "pixel", "--iw-samples", "2"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert not [line for line in TENSORFLOW_STARTUP if line.split("] ")[-1][:40] in output]
    assert "absl" not in output and "I0000" not in output and "final_train_loss" in output


# ---- Whole runs ----------------------------------------------------------------------------------

OUTPUTS = ["model.keras", "history.csv", "loss_curves.png", "reconstruction_images.png", "interpolation.png", "progress.gif",
           "latent_space_representation.png", "manifold.png", "samples.png", "metrics.json"]


def check_finished_run(results_dir, epochs):
    for name in OUTPUTS:
        assert (results_dir / name).stat().st_size > 0, name
        if name.endswith(".png"):
            assert (results_dir / name).read_bytes()[:4] == b"\x89PNG"
    rows = (results_dir / "history.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,") and [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, epochs + 1))
    metrics = json.loads((results_dir / "metrics.json").read_text())
    assert metrics["epochs"] == epochs and len(metrics["seconds_per_epoch"]) == epochs
    with Image.open(results_dir / "progress.gif") as gif:
        assert gif.n_frames == epochs  # one frame per epoch, resumed runs included
    fids = [f"fid_{kind}_{images}" for kind in metrics["config"]["fid"] for images in ("recon", "samples")]
    accuracy = ["classifier_test_accuracy"] if "classifier" in metrics["config"]["fid"] else []
    for key in ("final_train_loss", "final_test_loss", "final_test_kl_loss", "test_elbo", *fids, *accuracy):
        assert math.isfinite(metrics[key]), key
    assert metrics["config"]["latent_dim"] >= 1 and metrics["versions"]["keras"] == keras.__version__
    assert not list(results_dir.glob(".*partial*")), "a temporary file was left behind"
    assert not (results_dir / "run.lock").exists(), "a finished run left its lock file"
    return metrics


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_mnist):
    return shared_run(tmp_path_factory, "vae.py", "--data", tiny_mnist, *QUICK)


def test_run_writes_every_output(finished_run, tiny_mnist):
    results_dir, result = finished_run
    metrics = check_finished_run(results_dir, epochs=2)
    model = fid.load_model(results_dir / "model.keras")  # the numbers are the model's, to the digit
    x_test = vae.to_float_images(vae.load_dataset(tiny_mnist)[2])
    z_mean, z_log_var = vae.encode(model, x_test)
    assert metrics["active_units"] == np.sum(np.var(z_mean.astype(np.float64), axis=0) > 0.01)
    estimate = vae.importance_weighted_log_likelihood(model, x_test, 8, seed=0, xla=False, verbose=False)  # as the run
    assert metrics["iw_samples"] == 8 and metrics["test_log_likelihood_iw"] == float(np.mean(estimate))
    assert sum(metrics["kl_per_dimension"]) == pytest.approx(metrics["test_kl"], rel=1e-5)
    assert re.search(r"active_units +\d  latent dimensions in use", result.stdout)
    assert re.search(r"kl_per_dimension +[\d.]+, [\d.]+  nats per image", result.stdout)
    for images in ("recon", "samples"):  # beside the classifier FID: KID and the k-NN metrics
        assert metrics[f"kid_classifier_{images}_std"] >= 0
        for metric in ("precision", "recall", "coverage"):
            assert 0 <= metrics[f"{metric}_classifier_{images}"] <= 1
        assert metrics[f"density_classifier_{images}"] >= 0
    kid = fid.kid_text(metrics["kid_classifier_samples"], metrics["kid_classifier_samples_std"])
    assert f"kid_classifier_samples {kid}" in " ".join(result.stdout.split())  # as fid.py prints it
    assert not any(key.endswith("_pixel_recon") and not key.startswith("fid") for key in metrics)
    assert not {"\x1b", "\b", "\r"} & set(result.stdout + result.stderr)  # a log file's plain lines
    assert "Dense VAE: 2 epochs" in result.stdout and re.search(r"fid_pixel_recon +[\d.]+\n", result.stdout)
    assert re.search(r"test_kl +[\d.]+  nats per image", result.stdout)  # units beside the numbers


def test_evaluate_only_reproduces_the_metrics(finished_run, tmp_path, tiny_mnist):
    """From the model and checkpoint.json alone: the epoch checkpoints may be deleted to save disk."""
    results_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], results_dir, ignore=shutil.ignore_patterns("checkpoint-epoch*"))
    before = json.loads((results_dir / "metrics.json").read_text())
    gif = (results_dir / "progress.gif").read_bytes()
    for figure in ("progress.gif", "loss_curves.png", "samples.png"):
        (results_dir / figure).unlink()
    run_ok("vae.py", "--data", tiny_mnist, "--results-dir", results_dir, *QUICK, "--evaluate-only")
    assert (results_dir / "progress.gif").read_bytes() == gif  # drawn again from the run's frames
    assert (results_dir / "loss_curves.png").is_file() and (results_dir / "samples.png").is_file()
    after = json.loads((results_dir / "metrics.json").read_text())
    for key in ("test_elbo", "test_log_likelihood_iw", "fid_pixel_recon", "fid_pixel_samples", "fid_classifier_recon",
                "fid_classifier_samples", "classifier_test_accuracy", "final_test_loss"):
        assert after[key] == pytest.approx(before[key], rel=1e-5), key
    assert after["seconds_per_epoch"] == before["seconds_per_epoch"]


def test_finished_run_is_not_overwritten(finished_run, tiny_mnist):
    results_dir, _ = finished_run
    model_bytes = (results_dir / "model.keras").read_bytes()
    result = run_main("vae.py", "--data", tiny_mnist, "--results-dir", results_dir, *QUICK)
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert "a finished run" in line and all(flag in line for flag in ("--resume", "--evaluate-only", "--overwrite"))
    assert (results_dir / "model.keras").read_bytes() == model_bytes
    result = run_main("vae.py", "--data", "/no/such/file.npz", "--results-dir", results_dir)
    assert error_lines(result.stderr) == ["vae.py: error: /no/such/file.npz: no such file or directory"]


def test_higher_latent_dimension_uses_pca_and_skips_the_manifold(tmp_path, tiny_mnist):
    args = ["--latent-dim", "20", "--likelihood", "bernoulli", "--binarize", "dynamic", "--output-bias", "data-mean",
            "--plain", "--fid", "none"]
    result = run_ok("vae.py", "--data", tiny_mnist, "--results-dir", tmp_path, *QUICK, *args)
    assert "manifold figure is skipped" in result.stdout
    assert not (tmp_path / "manifold.png").exists() and (tmp_path / "interpolation.png").stat().st_size > 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["config"]["likelihood"], metrics["config"]["output_bias"], metrics["config"]["plain"]) == (
        "bernoulli", "data-mean", True)
    assert math.isfinite(metrics["test_log_likelihood_iw"])


def wait_for_epochs(results_dir, epochs, process, timeout=120):
    """Until the run has committed the checkpoint of `epochs` epochs and then (right after it)
    written them to history.csv."""
    deadline = time.time() + timeout
    state, history = results_dir / "checkpoint.json", results_dir / "history.csv"
    while time.time() < deadline and process.poll() is None:
        if (state.exists() and json.loads(state.read_text())["epochs_done"] >= epochs
                and history.exists() and len(history.read_text().splitlines()) > epochs):
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach {epochs} epochs: {process.communicate()[1][-2000:]}")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_resumes_to_the_end(tmp_path, tiny_mnist, sig):
    args = [sys.executable, str(ROOT / "vae.py"), "--data", str(tiny_mnist), "--results-dir", str(tmp_path),
            "--epochs", "100", "--batch-size", "16", "--fid", "none", "--iw-samples", "0"]
    # A shell's background job (`pytest ... &`) starts with SIGINT ignored, which its children inherit.
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_epochs(tmp_path, 2, process)
    rows = (tmp_path / "history.csv").read_text().splitlines()  # written every epoch, to follow a long run
    assert rows[0].startswith("epoch,") and len(rows) - 1 >= 2 and (tmp_path / "loss_curves.png").is_file()
    second = run_main("vae.py", *args[2:], "--resume")  # a second terminal, the same directory
    assert second.returncode == 2
    assert "in use by a run still going" in error_lines(second.stderr)[0]
    process.send_signal(sig)
    stdout, _ = process.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert process.returncode == 130, stdout[-3000:]
        assert f"resume with: {shlex.join([sys.executable, 'vae.py', *args[2:], '--resume'])}" in stdout
    else:
        assert process.returncode == -signal.SIGKILL
    assert not (tmp_path / "metrics.json").exists()
    epochs = json.loads((tmp_path / "checkpoint.json").read_text())["epochs_done"] + 2
    result = run_ok("vae.py", "--data", tiny_mnist, "--results-dir", tmp_path, "--epochs", epochs,
                    "--fid", "none", "--iw-samples", "0", "--resume")  # the dead process's lock is taken over
    assert "resuming from epoch" in result.stdout
    check_finished_run(tmp_path, epochs=epochs)
    assert [path.name for path in tmp_path.glob("checkpoint-epoch*.keras")] == [f"checkpoint-epoch{epochs}.keras"]


def test_resume_completes_a_run_interrupted_during_its_evaluation(tmp_path, tiny_mnist, monkeypatch):
    args = ["--data", tiny_mnist, "--results-dir", tmp_path, *QUICK, "--fid", "pixel"]
    with monkeypatch.context() as patch:  # Ctrl-C in the likelihood estimate, after training
        patch.setattr(vae, "importance_weighted_log_likelihood", Mock(side_effect=KeyboardInterrupt))
        interrupted = run_main("vae.py", *args)
    assert interrupted.returncode == 130 and "interrupted" in interrupted.stdout
    assert (tmp_path / "model.keras").exists() and not (tmp_path / "metrics.json").exists()
    result = run_ok("vae.py", *args, "--resume")
    assert "training finished (2 epochs) but its evaluation did not: completing it" in result.stdout
    metrics = check_finished_run(tmp_path, epochs=2)
    trained = json.loads((tmp_path / "checkpoint.json").read_text())["seconds_per_epoch"]
    assert metrics["iw_samples"] == 8 and metrics["seconds_per_epoch"] == [round(s, 3) for s in trained]  # not retrained
    again = run_main("vae.py", *args, "--resume")
    assert again.returncode == 2 and "already trained 2 epochs and evaluated" in error_lines(again.stderr)[0]


def test_resumed_run_learns_exactly_what_an_unbroken_run_learns_then_extends_keeping_its_configuration(
        finished_run, tmp_path, tiny_mnist):
    for epochs, resume in (("1", []), ("2", ["--resume"])):
        run_ok("vae.py", "--data", tiny_mnist, "--results-dir", tmp_path, *QUICK, "--epochs", epochs,
               "--fid", "none", "--iw-samples", "0", *resume)
    unbroken = json.loads((finished_run[0] / "checkpoint.json").read_text())["history"]
    resumed = json.loads((tmp_path / "checkpoint.json").read_text())["history"]
    assert resumed == unbroken  # weights, optimizer, random streams and the data order all carry over
    for a, b in zip(*(fid.load_model(folder / "model.keras").get_weights() for folder in (finished_run[0], tmp_path))):
        np.testing.assert_array_equal(a, b)
    assert resumed["loss"] == [r + k for r, k in zip(np.float32(resumed["reconstruction_loss"]),
                                                     np.float32(resumed["kl_loss"]))]  # the sum of its terms
    refused = run_main("vae.py", "--data", tiny_mnist, "--results-dir", tmp_path, "--resume", "--hidden-dim", "64")
    assert refused.returncode == 2 and "--hidden-dim 64 differs" in error_lines(refused.stderr)[0]
    run_ok("vae.py", "--data", tiny_mnist, "--results-dir", tmp_path, *QUICK[2:], "--epochs", "3", "--resume",
           "--fid", "none", "--iw-samples", "0")  # the finished run, extended
    assert check_finished_run(tmp_path, epochs=3)["config"]["batch_size"] == 32
    state = json.loads((tmp_path / "checkpoint.json").read_text())
    checkpoint = tmp_path / state["model_file"]
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    result = run_main("vae.py", "--data", tiny_mnist, "--results-dir", tmp_path, "--epochs", "4", "--resume")
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert f"{checkpoint.name}: unreadable model file (truncated or damaged" in line


def test_diverging_loss_stops_with_a_message_and_a_non_finite_epoch_keeps_the_last_good_checkpoint(
        finished_run, tmp_path, tiny_mnist):
    result = run_main("vae.py", "--data", tiny_mnist, "--results-dir", tmp_path, *QUICK, "--learning-rate", "1e12")
    assert result.returncode == 1
    assert "loss became NaN or infinite in epoch 1" in error_lines(result.stderr)[-1]
    assert not (tmp_path / "model.keras").exists()
    results_dir, _ = finished_run
    state = json.loads((results_dir / "checkpoint.json").read_text())
    checkpoints = vae.RunCallback(results_dir, state["config"], state, "VAE", "nats", None, None, None, False)
    checkpoints.set_model(fid.load_model(results_dir / state["model_file"]))
    checkpoints.on_epoch_begin(2)
    checkpoints.on_epoch_end(2, {"loss": float("nan"), "val_loss": 1.0})
    assert checkpoints.model.stop_training and checkpoints.diverged_epoch == 3
    assert json.loads((results_dir / "checkpoint.json").read_text()) == state


def test_real_mnist_run(real_mnist, tmp_path):
    """The full data path under CI: 6 epochs on 8,576 real digits (134 batches of 64, two groups
    of 67: a full run's grouped, XLA-compiled steps in one compilation) learn digits beyond the
    best constant model, the mean test digit (whose ELBO is -E||x - mean||^2 less the Gaussian
    constant, its KL 0): 6.4 nats and 27% of its pixel FID beyond it here."""
    run_ok("vae.py", "--data", real_mnist, "--results-dir", tmp_path, "--train-size", "8576", "--test-size", "1000",
           "--epochs", "6", "--fid", "pixel", "--fid-samples", "1000", "--iw-samples", "16")
    metrics = check_finished_run(tmp_path, epochs=6)
    test_images = vae.load_dataset(real_mnist)[2][:1000] / 255
    mean_images = np.repeat(test_images.mean(axis=0, keepdims=True), 1000, axis=0)
    mean_elbo = -np.mean(np.sum((test_images - mean_images) ** 2, axis=(1, 2))) - 392 * math.log(math.pi)
    assert metrics["test_elbo"] > mean_elbo + 5
    assert metrics["fid_pixel_recon"] < 0.8 * fid.pixel_fid(test_images, mean_images)
    assert metrics["test_log_likelihood_iw"] > metrics["test_elbo"]  # K=16 is tighter than one sample


def test_inception_fids_with_a_weights_file(tmp_path, tiny_mnist, random_weights_file, monkeypatch):
    """The Inception path end to end, offline: random weights saved to a file stand in for
    ImageNet's; the test set's features are cached for the next evaluation. The distance itself
    (sqrtm of a 2048 x 2048 product: a minute here) is tested in test_fid.py; here each call gets
    the test set's and the generated images' statistics, and its value lands in metrics.json."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    compared = []
    monkeypatch.setattr(fid, "frechet_distance", lambda a, b: compared.append((a, b)) or 10.0 * len(compared))
    result = run_ok("vae.py", "--data", tiny_mnist, "--results-dir", tmp_path / "run", "--epochs", "1",
                    "--fid-samples", "10", "--iw-samples", "0", "--test-size", "10", "--fid", "inception",
                    "--inception-weights", random_weights_file)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["fid_inception_recon"], metrics["fid_inception_samples"]) == (10.0, 20.0)
    for metric in ("kid", "precision", "recall", "density", "coverage"):
        assert math.isfinite(metrics[f"{metric}_inception_samples"]), metric
    assert "fid: computing Inception features of 10 images" in result.stderr
    [cached] = (tmp_path / "cache" / "mnist-vae-fid").glob("inception-features-*.npz")
    with np.load(cached) as entry:  # what --evaluate-only reads instead of recomputing
        assert entry["features"].shape == (10, 2048)
        test_features = entry["features"].astype(np.float64)
    for reference, generated in compared:  # the test set against reconstructions, then samples
        assert reference.features == generated.features == "inception" and generated.n == 10
        np.testing.assert_allclose(reference.mu, test_features.mean(axis=0), rtol=1e-6, atol=1e-9)
        assert not np.allclose(generated.mu, reference.mu)


def test_missing_imagenet_weights_is_a_warning_not_a_failure(monkeypatch, tmp_path, tiny_mnist):
    offline = fid.InceptionUnavailable("cannot load Inception weights 'imagenet': no network")
    monkeypatch.setattr(fid, "load_inception", Mock(side_effect=offline))
    result = run_ok("vae.py", "--data", tiny_mnist, "--results-dir", tmp_path, *QUICK, "--fid", "all",
                    "--iw-samples", "0")
    assert "warning: Inception weights unavailable" in result.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["fid_inception_recon"] is None and "no network" in metrics["fid_inception_error"]
    assert math.isfinite(metrics["fid_pixel_recon"])


def test_full_disk_keeps_the_last_checkpoint_and_no_partial_file(monkeypatch, tmp_path, tiny_mnist, capsys):
    real_save = vae.VAE.save
    saves = []

    def save_until_disk_is_full(model, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 1:
            return real_save(model, path, *args, **kwargs)
        Path(path).write_bytes(b"half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(vae.VAE, "save", save_until_disk_is_full)
    assert vae.main(list(map(str, ["--data", tiny_mnist, "--results-dir", tmp_path, *QUICK, "--epochs", "3"]))) == 1
    error = capsys.readouterr().err
    assert "No space left on device" in error
    state = json.loads((tmp_path / "checkpoint.json").read_text())
    assert state["epochs_done"] == 1 and (tmp_path / state["model_file"]).is_file()
    assert "the last complete one (1 epoch) is intact" in error  # what is on disk, not epoch 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-epoch1.keras", "checkpoint.json", "history.csv",
                                                         "loss_curves.png", "progress_frames.npy"]


def test_one_class_data_trains_and_evaluates(tmp_path):
    """A VAE of only the 3s: no two classes to interpolate between, so consecutive test images
    are; every figure and metric still comes out."""
    x_train, x_test = (tiny_digits(count, np.random.default_rng(0))[0] for count in (128, 32))
    np.savez(tmp_path / "threes.npz", x_train=x_train, y_train=np.full(128, 3), x_test=x_test, y_test=np.full(32, 3))
    run_ok("vae.py", "--data", tmp_path / "threes.npz", "--results-dir", tmp_path / "run", *QUICK, "--epochs", "1")
    assert math.isfinite(check_finished_run(tmp_path / "run", epochs=1)["fid_classifier_samples"])
    model = fid.load_model(tmp_path / "run" / "model.keras")
    x = vae.to_float_images(x_test)
    starts, _, ends, row_labels = vae.interpolate(model, x, np.full(32, 3), vae.encode(model, x)[0],
                                                  vae.DATASETS["mnist"][2])
    assert row_labels == ["3 \N{RIGHTWARDS ARROW} 3"] * 10
    np.testing.assert_array_equal(starts, x[0:20:2])
    np.testing.assert_array_equal(ends, x[1:20:2])


# ---- The conditional VAE -------------------------------------------------------------------------

CONDITIONAL = ["--conditional", "--batch-size", "16", "--fid", "none", "--iw-samples", "0"]


@pytest.fixture(scope="module")
def trained_conditional_run(tmp_path_factory, tiny_mnist):
    """20 epochs at a larger learning rate: enough for the tiny strokes' angle to follow the label."""
    return shared_run(tmp_path_factory, "vae.py", "--data", tiny_mnist, "--epochs", "20", "--learning-rate", "3e-3",
                      *CONDITIONAL[:3], "--fid", "classifier", "--fid-samples", "200", "--iw-samples", "0")


def test_a_conditional_run_resumes_exactly(tmp_path, tiny_mnist):
    for epochs, resume, folder in (("2", [], "unbroken"), ("1", [], "resumed"), ("2", ["--resume"], "resumed")):
        run_ok("vae.py", "--data", tiny_mnist, "--results-dir", tmp_path / folder, "--epochs", epochs,
               *CONDITIONAL, *resume)
    unbroken, resumed = (json.loads((tmp_path / folder / "checkpoint.json").read_text())["history"]
                         for folder in ("unbroken", "resumed"))
    assert resumed == unbroken
    for a, b in zip(*(fid.load_model(tmp_path / folder / "model.keras").get_weights()
                      for folder in ("unbroken", "resumed"))):
        np.testing.assert_array_equal(a, b)
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert metrics["config"]["conditional"] is True and "label_accuracy" not in metrics  # --fid none
    for figure in ("conditional_samples.png", "analogies.png", "manifold.png", "samples.png"):
        assert (tmp_path / "resumed" / figure).read_bytes()[:4] == b"\x89PNG", figure


def label_accuracy(model, classifier, count=200):
    labels = vae.balanced_labels(count, model.classes)
    z = np.random.default_rng(1).standard_normal((count, 2)).astype(np.float32)
    return fid.classifier_accuracy(classifier, vae.decode(model, z, vae.one_hot(labels, model.classes)), labels)


def test_samples_are_of_the_class_asked_for_unless_the_decoder_ignores_the_label(trained_conditional_run, tiny_mnist):
    results_dir, _ = trained_conditional_run
    metrics = json.loads((results_dir / "metrics.json").read_text())
    assert metrics["label_accuracy"] > 0.5  # chance: 0.1 (the tiny data's classifier: about 0.8)
    assert len(metrics["fid_classifier_per_class"]) == 10 and len(metrics["kid_classifier_per_class"]) == 10
    model = fid.load_model(results_dir / "model.keras")
    classifier = fid.load_or_train_classifier(*vae.load_dataset(tiny_mnist), verbose=False)
    assert label_accuracy(model, classifier) > 0.5
    z = np.zeros((2, 2), np.float32)
    two_labels = vae.one_hot(np.array([1, 6]), 10)
    first, second = vae.decode(model, z, two_labels)
    assert np.abs(first - second).max() > 0.1  # the label changes what is drawn
    dense = next(layer for layer in model.decoder.layers if isinstance(layer, keras.layers.Dense))
    kernel, bias = dense.get_weights()  # its input: z, then the label; the label's weights zero
    assert kernel.shape[0] == 2 + 10
    kernel[2:] = 0
    dense.set_weights([kernel, bias])
    first, second = vae.decode(model, z, two_labels)
    np.testing.assert_array_equal(first, second)
    assert label_accuracy(model, classifier) < 0.3


def test_a_model_saved_before_the_conditional_option_still_loads(finished_run, tmp_path):
    with zipfile.ZipFile(finished_run[0] / "model.keras") as saved:
        files = {name: saved.read(name) for name in saved.namelist()}
    config = json.loads(files["config.json"])
    assert config["config"].pop("classes") == 0
    files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(tmp_path / "old.keras", "w") as old:
        for name, data in files.items():
            old.writestr(name, data)
    model = fid.load_model(tmp_path / "old.keras")
    assert model.classes == 0
