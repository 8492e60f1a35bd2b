"""Tests for fid.py in its order: closed forms, the original pixel metric, Inception with random weights,
the cache, KID and PRDC against their definitions, the digit classifier, the command line, the shared part."""

import argparse
import os
import subprocess
import sys
import types
import warnings
import zipfile
from pathlib import Path
from unittest.mock import Mock

import keras
import matplotlib.pyplot as plt
import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance

from conftest import ROOT as REPO_ROOT
from conftest import tiny_digits

import fid


def gaussian(mu, sigma, features="pixel"):
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    return fid.Statistics(mu, np.asarray(sigma, dtype=np.float64).reshape(mu.size, mu.size), 100, features)


def random_images(seed, count=100, side=8):  # uint8, with a constant black border like MNIST's
    images = np.zeros((count, side, side), dtype=np.uint8)
    images[:, 1:-1, 1:-1] = np.random.default_rng(seed).integers(0, 256, (count, side - 2, side - 2))
    return images


def statistics(images, kind="pixel", network=None):
    return fid.statistics_from_features(fid.compute_features(images, kind, network, verbose=False), kind)


def original_pixel_fid(images_a, images_b):
    """The original repo's metric, written out independently of fid.py."""
    a = images_a.reshape(len(images_a), -1).astype(np.float64) / 255
    b = images_b.reshape(len(images_b), -1).astype(np.float64) / 255
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # the constant border makes both covariances singular
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b).real
    mean_difference = a.mean(axis=0) - b.mean(axis=0)
    return mean_difference @ mean_difference + np.trace(sigma_a + sigma_b - 2 * covmean)


# ---------------------------------------------------------------- frechet_distance
def test_frechet_distance_matches_closed_forms_is_symmetric_and_zero_for_one_set_and_refuses_a_mismatch():
    assert fid.frechet_distance(gaussian(1.0, 4.0), gaussian(-2.0, 9.0)) == pytest.approx(3**2 + (2 - 3) ** 2)
    mu_a, mu_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    distance = fid.frechet_distance(gaussian(mu_a, np.diag(var_a)), gaussian(mu_b, np.diag(var_b)))
    assert distance == pytest.approx(expected)
    a, b = statistics(random_images(0)), statistics(random_images(1))
    assert fid.frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    assert fid.frechet_distance(a, b) == pytest.approx(fid.frechet_distance(b, a), rel=1e-9)
    with pytest.raises(ValueError, match="dimensions differ: 2 vs 3"):
        fid.frechet_distance(gaussian([0, 0], np.eye(2)), gaussian([0, 0, 0], np.eye(3)))
    with pytest.raises(ValueError, match="pixel statistics with inception"):
        fid.frechet_distance(gaussian(0, 1), gaussian(0, 1, features="inception"))
    with pytest.raises(ValueError, match="imaginary component of 1 on its diagonal"):  # sqrtm has i on it
        fid.frechet_distance(gaussian([0, 0], np.eye(2)), gaussian([0, 0], np.diag([-1.0, 1.0])))


def test_non_finite_sqrtm_is_retried_with_eps_on_the_diagonals(monkeypatch, capsys):
    products, real_sqrtm = [], scipy.linalg.sqrtm
    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", lambda product: products.append(product) or (
        np.full_like(product, np.inf) if len(products) == 1 else real_sqrtm(product)))
    sigma_a, sigma_b = np.diag([1.0, 0.0]), np.diag([4.0, 0.0])  # rank-deficient, like a constant pixel
    assert fid.frechet_distance(gaussian([0, 0], sigma_a), gaussian([0, 0], sigma_b)) == pytest.approx(1.0, abs=1e-5)
    assert len(products) == 2 and "retrying with 1e-06 added to both diagonals" in capsys.readouterr().err
    np.testing.assert_allclose(products[1], (sigma_a + 1e-6 * np.eye(2)) @ (sigma_b + 1e-6 * np.eye(2)))


# ---------------------------------------------------------------- pixel features
def test_pixel_fid_is_the_original_formula_on_any_image_form():
    images_a, images_b = random_images(0), random_images(1)
    assert fid.pixel_fid(images_a, images_b) == pytest.approx(original_pixel_fid(images_a, images_b), rel=1e-9)
    assert fid.pixel_fid(images_a, images_a) == pytest.approx(0, abs=1e-8)
    images = random_images(2, count=30, side=28)
    reference = fid.compute_features(images, "pixel")
    assert reference.shape == (30, 784) and reference.dtype == np.float64 and reference.max() == 1.0
    for variant in (images / 255.0, (images / 255).astype(np.float32), images[..., None], images.reshape(30, 784)):
        np.testing.assert_allclose(fid.compute_features(variant, "pixel"), reference, atol=1e-7)
    gaussian_fit = fid.statistics_from_features(reference, "pixel")
    np.testing.assert_array_equal(gaussian_fit.sigma, np.cov(reference, rowvar=False))
    assert (gaussian_fit.n, gaussian_fit.features) == (30, "pixel")


@pytest.mark.parametrize("images, message", [
    (np.full((4, 8, 8), 2.0), r"in \[0, 1\], got 2.0 to 2.0"),
    (np.full((4, 8, 8), np.nan), r"in \[0, 1\]"),
    (np.zeros((4, 8, 8), dtype=np.int64), "uint8 .* got int64"),
    (np.zeros((1, 8, 8), dtype=np.uint8), "at least 2 images"),
    (np.zeros((4, 8, 8, 3), dtype=np.uint8), r"shaped \(N, H, W\), \(N, H, W, 1\) or \(N, D\)"),
])
def test_pixel_features_reject_bad_images(images, message):
    with pytest.raises(ValueError, match=message):
        fid.compute_features(images, "pixel")


# ---------------------------------------------------------------- Inception (random weights)

SIX_IMAGES = random_images(3, count=6, side=28)


@pytest.fixture(scope="module")
def six_image_features(random_inception):
    return fid.compute_features(SIX_IMAGES, "inception", random_inception, batch_size=6, verbose=False)


def test_inception_features_are_the_models_whatever_the_batch_size(random_inception, six_image_features, capsys):
    corners = fid.inception_preprocess(np.stack([np.zeros((28, 28)), np.ones((28, 28))]).astype(np.float32)).numpy()
    assert corners.shape == (2, 299, 299, 3) and corners[0].max() == -1 and corners[1].min() == 1
    direct = random_inception(fid.inception_preprocess(SIX_IMAGES.astype(np.float32) / 255)).numpy()
    assert six_image_features.shape == (6, 2048) and six_image_features.dtype == np.float32
    np.testing.assert_allclose(six_image_features, direct, rtol=1e-4, atol=1e-6)
    in_fours = fid.compute_features(SIX_IMAGES, "inception", random_inception, batch_size=4)
    np.testing.assert_allclose(in_fours, six_image_features, rtol=1e-4, atol=1e-6)
    out, progress = capsys.readouterr()  # progress on stderr: stdout carries only results
    assert out == "" and "Inception features of 6 images (batch size 4)" in progress
    assert "6/6" in progress and "4/6" not in progress  # not a terminal: one line at the end


def test_weights_file_reproduces_model_and_features_in_float32_or_close_in_bfloat16_and_bad_ones_fail(
        random_inception, random_weights_file, six_image_features, tmp_path, capsys):
    reloaded = fid.load_inception(random_weights_file)
    assert reloaded.weights_sha256 == random_inception.weights_sha256
    assert fid.load_inception(None).weights_sha256 != random_inception.weights_sha256
    features = fid.compute_features(SIX_IMAGES, "inception", reloaded, batch_size=6, verbose=False)
    assert capsys.readouterr().err == ""  # verbose=False prints nothing
    np.testing.assert_allclose(features, six_image_features, rtol=1e-6, atol=1e-7)
    with pytest.raises(fid.InceptionUnavailable, match="cannot load Inception weights '.*missing.weights.h5'"):
        fid.load_inception(tmp_path / "missing.weights.h5")
    (tmp_path / "corrupt.weights.h5").write_bytes(b"not hdf5")
    with pytest.raises(fid.InceptionUnavailable, match="corrupt.weights.h5"):
        fid.load_inception(tmp_path / "corrupt.weights.h5")
    model = fid.load_inception(random_weights_file, dtype_policy="mixed_bfloat16")
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    assert model.layers[1].compute_dtype == "bfloat16" and model.weights[0].dtype == "float32"
    features = fid.compute_features(SIX_IMAGES, "inception", model, batch_size=6, verbose=False)
    exact = six_image_features.mean(axis=0)
    assert 0 < np.linalg.norm(features.mean(axis=0) - exact) / np.linalg.norm(exact) < 0.05  # close, not equal
    assert model.weights_sha256 == random_inception.weights_sha256  # the same weights, file to model
    assert fid.fingerprint(SIX_IMAGES, model) != fid.fingerprint(SIX_IMAGES, random_inception)


# ---------------------------------------------------------------- caching
def test_compute_features_reads_its_cache_by_a_fingerprint_and_replaces_a_damaged_entry(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(fid, "to_unit_float", lambda images, dtype, convert=fid.to_unit_float:
                        calls.append(1) or convert(images, dtype))
    images = random_images(4)
    first = fid.compute_features(images, "pixel", cache_dir=tmp_path)
    np.testing.assert_array_equal(fid.compute_features(images, "pixel", cache_dir=tmp_path), first)
    assert len(calls) == 1 and "using cached features" in capsys.readouterr().err
    [entry] = tmp_path.iterdir()
    assert entry.name == f"pixel-features-{fid.fingerprint(images)}.npz"
    entry.write_bytes(b"not an npz")
    np.testing.assert_array_equal(fid.compute_features(images, "pixel", cache_dir=tmp_path), first)
    assert len(calls) == 2 and "ignoring cache entry" in capsys.readouterr().err
    assert [path.name for path in tmp_path.iterdir()] == [entry.name]  # no temporary files left
    fid.compute_features(random_images(5), "pixel", cache_dir=tmp_path, verbose=False)
    assert len(calls) == 3 and len(list(tmp_path.iterdir())) == 2
    models = [types.SimpleNamespace(weights_sha256=name, dtype_policy=types.SimpleNamespace(name=policy))
              for name, policy in (("a", "float32"), ("b", "float32"), ("a", "mixed_bfloat16"))]
    fingerprints = {fid.fingerprint(images), fid.fingerprint(images[:-1]), fid.fingerprint(images.astype(np.float32)),
                    *(fid.fingerprint(images, model) for model in models)}  # images, weights and dtype policy
    assert len(fingerprints) == 6 and fid.fingerprint(images.copy()) == fid.fingerprint(images)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the default folder
    assert fid.default_cache_dir() == tmp_path / "mnist-vae-fid"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert fid.default_cache_dir() == Path.home() / ".cache" / "mnist-vae-fid"


# ---------------------------------------------------------------- kernel distance (KID)
def test_kernel_distance_matches_the_unbiased_formula_on_one_subset_of_all_samples():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(60, 7)), rng.normal(0.3, 1.2, size=(60, 7))

    def kernel(x, y):
        return (x @ y.T / 7 + 1) ** 3

    off_diagonal = ~np.eye(60, dtype=bool)
    expected = kernel(a, a)[off_diagonal].mean() + kernel(b, b)[off_diagonal].mean() - 2 * kernel(a, b).mean()
    mean, std = fid.kernel_distance(a, b, subsets=1, subset_size=60)
    assert mean == pytest.approx(expected, rel=1e-6, abs=1e-6) and std == 0
    with pytest.raises(ValueError, match="subset_size 61 is larger than a set: 60 and 60 features"):
        fid.kernel_distance(a, b, subset_size=61)
    with pytest.raises(ValueError, match=r"of one d, got \(60, 7\) and \(60, 6\)"):
        fid.kernel_distance(a, b[:, :6], subset_size=5)


# ------------------------------------------------ precision, recall, density, coverage
def brute_force_prdc(real, fake, k):
    """The definitions on full cdist matrices, written out independently of fid.py."""
    def radii(features):
        distances = scipy.spatial.distance.cdist(features, features)
        np.fill_diagonal(distances, np.inf)  # a sample is not its own neighbour
        return np.sort(distances, axis=1)[:, k - 1]

    real_radii, fake_radii = radii(real), radii(fake)
    real_fake = scipy.spatial.distance.cdist(real, fake)
    in_real_balls = real_fake <= real_radii[:, None]
    return {"precision": in_real_balls.any(axis=0).mean(),
            "recall": (real_fake <= fake_radii[None, :]).any(axis=1).mean(),
            "density": in_real_balls.sum() / (k * len(fake)),
            "coverage": (real_fake.min(axis=1) <= real_radii).mean()}


@pytest.mark.parametrize("k", [1, 3, 5, 10])
def test_prdc_matches_the_definitions_on_any_blocks_and_for_a_set_against_itself_or_far_away(k):
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(200, 8)), rng.normal(0.4, 1.3, size=(150, 8))
    expected = brute_force_prdc(real, fake, k)
    assert 0 < expected["precision"] < 1 and 0 < expected["coverage"] < 1  # not a trivial case
    assert fid.precision_recall_density_coverage(real, fake, k=k) == expected  # counts: exact
    assert fid.precision_recall_density_coverage(real, fake, k=k, block_size=7) == expected
    assert fid.precision_recall_density_coverage(fake, real, k=k, block_size=7) == brute_force_prdc(fake, real, k)
    for block_size in (7, 1000):
        itself = fid.precision_recall_density_coverage(real, real.copy(), k=k, block_size=block_size)
        # Closed balls: each sample lies in its own ball and in those of the k samples it is
        # a k-nearest neighbour of, so density counts k + 1 balls per sample.
        assert itself == brute_force_prdc(real, real, k)
        assert itself == {"precision": 1, "recall": 1, "density": (k + 1) / k, "coverage": 1}
    far_away = fid.precision_recall_density_coverage(real, real + 100, k=k)
    assert far_away == {"precision": 0, "recall": 0, "density": 0, "coverage": 0}
    with pytest.raises(ValueError, match="k=5 needs more than k samples.*got 5 real and 10 fake"):
        fid.precision_recall_density_coverage(np.zeros((5, 2)), np.zeros((10, 2)))


# ---------------------------------------------------------------- digit classifier
@pytest.fixture(scope="module")
def mnist_classifier(real_mnist, tmp_path_factory):
    """The classifier of the full MNIST training set: the committed one, found by the key of data and recipe."""
    with np.load(real_mnist) as mnist:
        data = {key: mnist[key] for key in ("x_train", "y_train", "x_test", "y_test")}
    classifier = fid.load_or_train_classifier(*data.values(), cache_dir=tmp_path_factory.mktemp("none"), verbose=False)
    return classifier, data


def test_mnist_runs_use_the_committed_classifier_which_reaches_99_percent(mnist_classifier, tmp_path, monkeypatch,
                                                                          capsys):
    classifier, data = mnist_classifier
    committed = fid.COMMITTED_CLASSIFIERS / f"classifier-{fid.classifier_key(data['x_train'], data['y_train'])}.keras"
    # Missing: the recipe or the network changed, so the key did; commit the retrained one.
    assert committed.is_file() and committed.with_suffix(".json").is_file()
    monkeypatch.setattr(fid, "train_classifier", lambda *args, **kwargs: pytest.fail("trained"))
    again = fid.load_or_train_classifier(*data.values(), cache_dir=tmp_path)
    assert again.weights_sha256 == classifier.weights_sha256 == fid.load_classifier(committed).weights_sha256
    assert f"fid: using committed classifier {committed} (test accuracy 99.22%)" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written to the cache
    assert fid.classifier_accuracy(classifier, data["x_test"], data["y_test"]) == classifier.test_accuracy >= 0.99


@pytest.fixture(scope="module")
def tiny_labelled_digits():
    rng = np.random.default_rng(0)
    return (*tiny_digits(512, rng), *tiny_digits(128, rng))


def test_two_fresh_caches_give_the_same_classifier_of_the_datas_shape_and_a_damaged_one_is_trained_again(
        tiny_labelled_digits, tmp_path, monkeypatch, capsys):
    classifiers = [fid.load_or_train_classifier(*tiny_labelled_digits, cache_dir=tmp_path / name, verbose=False)
                   for name in ("first", "second")]
    assert classifiers[0].weights_sha256 == classifiers[1].weights_sha256
    x_test = tiny_labelled_digits[2]
    distances = [fid.frechet_distance(statistics(x_test[:64], "classifier", classifier),
                                      statistics(x_test[64:], "classifier", classifier)) for classifier in classifiers]
    assert distances[0] == distances[1] > 0
    with monkeypatch.context() as patch:
        patch.setattr(fid, "train_classifier", lambda *args, **kwargs: pytest.fail("trained again"))
        cached = fid.load_or_train_classifier(*tiny_labelled_digits, cache_dir=tmp_path / "first", verbose=False)
    assert cached.weights_sha256 == classifiers[0].weights_sha256
    assert cached.test_accuracy == classifiers[0].test_accuracy > 0.5
    assert sorted(path.suffix for path in (tmp_path / "first").iterdir()) == [".json", ".keras"]
    with pytest.raises(ValueError, match="takes 28x28 images, got 8x8"):
        fid.compute_features(random_images(0), "classifier", cached)
    model = fid.build_classifier(np.zeros((2, 12, 16), np.uint8), np.array([0, 2]))
    assert model.input_shape == (None, 12, 16, 1) and model.output_shape == (None, 3)
    with pytest.raises(ValueError, match="at least 10x10 pixels, got 8x8"):
        fid.build_classifier(random_images(0), np.zeros(100))
    damaged = next((tmp_path / "first").glob("*.keras"))
    damaged.write_bytes(b"not a zip")
    again = fid.load_or_train_classifier(*tiny_labelled_digits, cache_dir=tmp_path / "first")
    assert again.weights_sha256 == classifiers[0].weights_sha256
    out, err = capsys.readouterr()
    assert f"ignoring cached classifier: {damaged}: unreadable model file" in err
    assert out == "" and "12/12" in err and "/step" in err  # 512 images in batches of 128, for 3 epochs
    assert f"classifier test accuracy {classifiers[0].test_accuracy:.2%}, cached in {damaged}" in err


def test_classifier_key_follows_images_and_labels_and_is_the_same_in_every_process(tiny_labelled_digits, tmp_path):
    images, labels = tiny_labelled_digits[:2]
    key = fid.classifier_key(images, labels)
    changed_label = np.concatenate([[(labels[0] + 1) % 10], labels[1:]]).astype(labels.dtype)
    assert len({key, fid.classifier_key(images[:-1], labels[:-1]), fid.classifier_key(images, changed_label),
                fid.classifier_key(images.astype(np.float32) / 255, labels)}) == 4
    fid.build_classifier(images, labels)  # layer names must not depend on earlier models
    np.savez(tmp_path / "data.npz", images=images, labels=labels)
    script = ("import sys, numpy as np; sys.path.insert(0, sys.argv[1]); import fid; "
              "data = np.load(sys.argv[2]); print(fid.classifier_key(data['images'], data['labels']))")
    other_process = subprocess.run([sys.executable, "-c", script, str(REPO_ROOT), str(tmp_path / "data.npz")],
                                   capture_output=True, text=True, timeout=120)
    assert other_process.stdout.strip() == key, other_process.stderr


# ---------------------------------------------------------------- command line
def run_main(argv, capsys):
    try:
        code = fid.main([str(arg) for arg in argv])
    except SystemExit as exit:  # argparse usage errors
        code = exit.code
    return code, *capsys.readouterr()


def write_png_folder(folder, images):
    folder.mkdir()
    for index, image in enumerate(images):
        plt.imsave(folder / f"{index:04d}.png", image, cmap="gray", vmin=0, vmax=255)
    return folder


@pytest.fixture
def image_files(tmp_path):
    images_a, images_b = random_images(6), random_images(7)
    np.savez(tmp_path / "a.npz", images_a)
    np.savez(tmp_path / "b.npz", images=images_b, labels=np.zeros(len(images_b)))
    return types.SimpleNamespace(a=images_a, b=images_b, a_npz=tmp_path / "a.npz", b_npz=tmp_path / "b.npz",
                                 a_png=write_png_folder(tmp_path / "a_png", images_a), dir=tmp_path)


def test_cli_pixel_fid_on_npz_png_folder_saved_statistics_a_chosen_key_and_as_a_real_process(image_files, capsys):
    pixel, expected = ["--features", "pixel"], fid.pixel_fid(image_files.a, image_files.b)
    assert run_main(pixel + [image_files.a_npz, image_files.b_npz], capsys)[:2] == (0, f"FID (pixel): {expected:.4f}\n")
    assert run_main(pixel + [image_files.a_npz, image_files.a_npz], capsys)[:2] == (0, "FID (pixel): 0.0000\n")

    read_back = np.stack([plt.imread(path)[..., 0] for path in sorted(image_files.a_png.iterdir())])
    code, out, err = run_main(pixel + [image_files.a_png, image_files.b_npz], capsys)
    assert code == 0 and float(out.split(":")[1]) == pytest.approx(fid.pixel_fid(read_back, image_files.b), abs=1e-4)
    stats_path = image_files.dir / "a_stats.npz"
    assert run_main(pixel + ["--save-stats", image_files.a_npz, stats_path], capsys)[:2] == (
        0, f"saved pixel statistics of 100 images to {stats_path}\n")
    with np.load(stats_path) as saved:
        assert set(saved.files) == {"mu", "sigma", "n", "features"}
        assert (int(saved["n"]), str(saved["features"])) == (100, "pixel")
    assert run_main(pixel + [stats_path, image_files.b_npz], capsys)[:2] == (0, f"FID (pixel): {expected:.4f}\n")
    np.savez(image_files.dir / "mnist_like.npz", x_train=image_files.a, x_test=image_files.b)
    code, out, _ = run_main(pixel + ["--key", "x_test", "--max-samples", "50", image_files.dir / "mnist_like.npz",
                                     image_files.a_npz], capsys)
    assert (code, out) == (0, f"FID (pixel): {fid.pixel_fid(image_files.b[:50], image_files.a[:50]):.4f}\n")

    def run_script(*args):  # fid.py as a real process
        return subprocess.run([sys.executable, str(REPO_ROOT / "fid.py"), *map(str, args)],
                              capture_output=True, text=True, cwd=image_files.dir, timeout=120)

    success = run_script(*pixel, image_files.a_npz, image_files.b_npz)
    assert (success.returncode, success.stdout) == (0, f"FID (pixel): {expected:.4f}\n"), success.stderr
    failure = run_script(*pixel, "missing.npz", image_files.b_npz)
    assert failure.returncode == 2 and failure.stderr == "fid.py: error: no such file or folder: missing.npz\n"


def test_cli_inception_with_a_weights_file_and_offline(random_inception, random_weights_file, tmp_path, monkeypatch,
                                                       capsys):
    # sqrtm of a 2048 x 2048 product is slow on CPU: only the statistics that reach it are checked
    compared = []
    monkeypatch.setattr(fid, "frechet_distance", lambda a, b: compared.append((a, b)) or 1.5)
    images = [random_images(seed, count=4, side=28) for seed in (8, 9)]
    for name, image_set in zip("ab", images):
        np.savez(tmp_path / f"{name}.npz", image_set)
    code, out, _ = run_main(["--inception-weights", random_weights_file, "--batch-size", "3",
                             tmp_path / "a.npz", tmp_path / "b.npz"], capsys)
    assert (code, out) == (0, "FID (inception): 1.5000\n")
    for compared_statistics, image_set in zip(compared[0], images):
        expected = statistics(image_set, "inception", random_inception)
        np.testing.assert_allclose(compared_statistics.mu, expected.mu, rtol=1e-5, atol=1e-7)
        # float32 features from batches of 3 and of 4 differ in their last bits
        np.testing.assert_allclose(compared_statistics.sigma, expected.sigma, atol=1e-4 * np.abs(expected.sigma).max())
    offline = fid.InceptionUnavailable("cannot load Inception weights 'imagenet': URL fetch failure")
    monkeypatch.setattr(fid, "load_inception", Mock(side_effect=offline))  # the hint: the kinds that need no download
    code, out, err = run_main([tmp_path / "a.npz", tmp_path / "b.npz"], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "URL fetch failure" in err and "--features classifier or --features pixel need no download" in err


def test_cli_classifier_fid_uses_mnists_committed_classifier_unless_one_is_named(tiny_labelled_digits, tmp_path,
                                                                                 monkeypatch, capsys):
    """A classifier of other data in the cache (one vae.py trained) is used only when named."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    sets = [tmp_path / "a.npz", tmp_path / "b.npz"]
    np.savez(sets[0], tiny_labelled_digits[2][:64])
    np.savez(sets[1], images=tiny_labelled_digits[2][64:])
    foreign = fid.load_or_train_classifier(*tiny_labelled_digits, verbose=False)  # cached, newest
    [committed_file] = fid.COMMITTED_CLASSIFIERS.glob("classifier-*.keras")
    expected = {name: fid.frechet_distance(statistics(tiny_labelled_digits[2][:64], "classifier", network),
                                           statistics(tiny_labelled_digits[2][64:], "classifier", network))
                for name, network in (("committed", fid.load_classifier(committed_file)), ("foreign", foreign))}
    assert f"{expected['committed']:.4f}" != f"{expected['foreign']:.4f}"
    code, out, err = run_main(["--features", "classifier", *sets], capsys)
    assert (code, out) == (0, f"FID (classifier): {expected['committed']:.4f}\n"), err
    assert f"fid: using MNIST's committed classifier {committed_file}" in err and "test accuracy 99.22%" in err
    [saved] = (tmp_path / "cache").rglob("classifier-*.keras")
    code, out, err = run_main(["--features", "classifier", "--classifier", saved, *sets], capsys)
    assert (code, out) == (0, f"FID (classifier): {expected['foreign']:.4f}\n") and "committed" not in err
    absent = tmp_path / "absent.keras"
    code, out, err = run_main(["--features", "classifier", "--classifier", absent, *sets], capsys)
    assert (code, err) == (2, f"fid.py: error: {absent}: no such model file\n")
    monkeypatch.setattr(fid, "COMMITTED_CLASSIFIERS", tmp_path / "none-committed")
    code, out, err = run_main(["--features", "classifier", *sets], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "no classifier committed" in err and "--classifier PATH" in err


def test_cli_kid_and_prdc_on_the_same_features(image_files, capsys):
    code, out, err = run_main(["--features", "pixel", "--kid", "--kid-subsets", "5", "--prdc", "--prdc-k", "3",
                               image_files.a_npz, image_files.b_npz], capsys)
    features = [fid.compute_features(images, "pixel") for images in (image_files.a, image_files.b)]
    mean, std = fid.kernel_distance(*features, subsets=5, subset_size=100)
    metrics = fid.precision_recall_density_coverage(*features, k=3)
    assert code == 0 and out.splitlines() == [
        f"FID (pixel): {fid.pixel_fid(image_files.a, image_files.b):.4f}", f"KID (pixel): {fid.kid_text(mean, std)}",
        "  ".join(f"{name} {metrics[name]:.3f}" for name in ("precision", "recall", "density", "coverage")) + " (k=3)"]
    assert "KID subsets of 100 samples, the smaller set's size (default 1000)" in err

    code, out, err = run_main(["--features", "pixel", "--kid", "--kid-subset-size", "50", "--kid-subsets", "5",
                               image_files.a_npz, image_files.b_npz], capsys)
    mean, std = fid.kernel_distance(*features, subsets=5, subset_size=50)
    assert (code, out.splitlines()[1]) == (0, f"KID (pixel): {fid.kid_text(mean, std)}") and "KID subsets" not in err


def test_cli_bad_inputs_exit_2_with_one_line(image_files, capsys):
    files = image_files
    (files.dir / "corrupt.npz").write_bytes(b"not an npz")
    (files.dir / "empty").mkdir()
    np.savez(files.dir / "two_arrays.npz", x=files.a, y=files.b)
    np.savez(files.dir / "flat_vectors.npz", np.zeros(10, dtype=np.uint8))
    np.savez(files.dir / "nan.npz", np.full((4, 8, 8), np.nan))
    broken_png = write_png_folder(files.dir / "broken_png", files.a[:2])
    (broken_png / "0001.png").write_bytes(b"not a png")
    mixed_png = write_png_folder(files.dir / "mixed_png", files.a[:2])
    plt.imsave(mixed_png / "0002.png", np.zeros((16, 16)), cmap="gray")
    pixel_stats, small_stats = files.dir / "pixel_stats.npz", files.dir / "small_stats.npz"
    np.savez(pixel_stats, **statistics(files.a)._asdict())
    np.savez(small_stats, **statistics(files.a[:, :4, :4])._asdict())
    pixel = ["--features", "pixel"]
    for argv, message in [
        (pixel + [files.dir / "missing.npz", files.b_npz], "no such file or folder"),
        (pixel + [files.dir / "corrupt.npz", files.b_npz], "cannot read"),
        (pixel + [files.dir / "empty", files.b_npz], "no PNG images"),
        (pixel + [files.dir / "two_arrays.npz", files.b_npz], "arrays are: x, y"),
        (pixel + ["--key", "nope", files.b_npz, files.a_npz], "no array 'nope'"),
        (pixel + [files.dir / "flat_vectors.npz", files.b_npz], "flat_vectors.npz: expected grayscale images shaped"),
        (pixel + [files.dir / "nan.npz", files.b_npz], "[0, 1]"),
        (pixel + [broken_png, files.b_npz], "cannot read image"),
        (pixel + [mixed_png, files.b_npz], "share one size"),
        ([pixel_stats, files.b_npz], "holds pixel statistics, but --features is inception"),
        (pixel + [small_stats, files.b_npz], "dimensions differ: 16 vs 64"),
        (pixel + ["--batch-size", "0", files.a_npz, files.b_npz], "must be a positive integer, got 0"),
        (["--inception-weights", files.dir / "missing.weights.h5", files.a_npz, files.b_npz], "missing.weights.h5"),
        (pixel + ["--prdc", pixel_stats, files.b_npz], "is a statistics file: with --prdc, pass images"),
        (pixel + ["--kid", "--kid-subset-size", "101", files.a_npz, files.b_npz],
         "--kid-subset-size 101 is larger than a set: 100 and 100 images"),
        (pixel + ["--prdc", "--prdc-k", "100", files.a_npz, files.b_npz], "needs more than 100 images"),
        (pixel + ["--kid", "--save-stats", files.a_npz, files.dir / "out.npz"], "--kid cannot go with it"),
        (pixel + ["--save-stats", files.a_npz, files.dir / "no" / "out.npz"], "its folder does not exist"),
    ]:
        code, out, err = run_main(argv, capsys)
        assert code == 2, argv
        assert out == "" and len(err.splitlines()) == 1, (argv, err)
        assert err.startswith("fid.py: error: ") and message in err, (argv, err)


# ---------------------------------------------------------------- what the scripts share
@pytest.mark.parametrize("parse, text, value, bad, message", [
    (fid.positive_int, "1", 1, "0", "must be a positive integer, got 0"),
    (fid.non_negative_int, "0", 0, "-1", "must be 0 or more, got -1"),
    (fid.positive_float, "1e-3", 1e-3, "nan", "must be a positive number, got nan"),
    (fid.positive_float, "2", 2.0, "inf", "must be a positive number, got inf"),
    (fid.unit_interval, "0.25", 0.25, "1", r"must be in \[0, 1\), got 1"),
])
def test_shared_argument_types_accept_their_range_only(parse, text, value, bad, message):
    assert parse(text) == value
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse(bad)


def test_exit_code_and_load_model_turn_each_failure_into_one_line(capsys, tmp_path):
    assert fid.exit_code("prog", lambda: None) == 0  # each Mock a work that raises its side effect
    assert fid.exit_code("prog", Mock(side_effect=fid.UsageError("bad input"))) == fid.EXIT_USAGE == 2
    assert fid.exit_code("prog", Mock(side_effect=fid.RunFailed("disk full"))) == fid.EXIT_FAILED == 1
    interrupted = Mock(side_effect=KeyboardInterrupt())
    assert fid.exit_code("prog", interrupted, interrupted="saved") == fid.EXIT_INTERRUPTED == 130
    assert capsys.readouterr() == ("\ninterrupted: saved\n", "prog: error: bad input\nprog: error: disk full\n")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])  # load_model names the file and the fault
    model.save(tmp_path / "whole.keras")
    assert fid.load_model(tmp_path / "whole.keras", compile=False).count_params() == 3
    (tmp_path / "truncated.keras").write_bytes((tmp_path / "whole.keras").read_bytes()[:200])
    with zipfile.ZipFile(tmp_path / "not_a_model.keras", "w") as archive:
        archive.writestr("notes.txt", "no config.json")
    damaged = "unreadable model file (truncated or damaged: not a complete .keras archive)"
    for name, line in [("missing.keras", "no such model file"), ("truncated.keras", damaged),
                       ("not_a_model.keras", "cannot load the model (KeyError: ")]:
        with pytest.raises(fid.UsageError) as raised:
            fid.load_model(tmp_path / name)
        assert str(raised.value).startswith(f"{tmp_path / name}: {line}") and "\n" not in str(raised.value)


# TensorFlow's start-up lines on a CPU-only machine, verbatim (before its logging starts).
TENSORFLOW_STARTUP = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796541333.062026    8807 port.cc:153] oneDNN custom operations are on. You may see slightly "
    "different numerical results due to floating-point round-off errors from different computation orders. To turn "
    "them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.",
    "I0000 00:00:1796541333.062242    8807 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
    "not be used.",
    "I0000 00:00:1796541333.143386    8807 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use "
    "available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 AVX512F AVX512_VNNI AVX512_BF16 AVX512_FP16 AVX_VNNI AMX_TILE "
    "AMX_INT8 AMX_BF16 FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.",
    "E0000 00:00:1796541338.276227    8807 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed "
    "call to cuInit: UNKNOWN ERROR (303)",
]


def test_tensorflow_startup_lines_are_dropped_and_every_other_line_shows(capfd):
    """At the file descriptor, where TensorFlow's C++ writes: an error among them still shows, in its place."""
    errors = ["E0000 00:00:1796541338.300000    8807 op_kernel.cc:1857] OP_REQUIRES failed at xla_ops.cc: INTERNAL",
              "Traceback (most recent call last):", "oneDNN custom operations are on, said by someone else"]
    with fid.stderr_without(fid.TENSORFLOW_STARTUP_LINES):
        for line in [*TENSORFLOW_STARTUP[:3], errors[0], *TENSORFLOW_STARTUP[3:], *errors[1:]]:
            os.write(2, f"{line}\n".encode())
    assert capfd.readouterr().err.splitlines() == errors
