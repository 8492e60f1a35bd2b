"""Shared test fixtures: the repo root on sys.path, tiny MNIST-shaped files, and script runs."""

import contextlib
import fcntl
import hashlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# The real MNIST: $MNIST_NPZ, else the copy keras.datasets.mnist.load_data() keeps.
REAL_MNIST = Path(os.environ.get("MNIST_NPZ") or Path.home() / ".keras" / "datasets" / "mnist.npz")
sys.path.insert(0, str(ROOT))  # the scripts live at the repo root

# Tests never touch the user's FID cache. The pytest-xdist workers of one session share theirs,
# so a tiny data set's classifier is trained once per session, not once per worker.
SESSION = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
CACHE = Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / f"mnist-vae-test-cache-{SESSION}"
os.environ["XDG_CACHE_HOME"] = str(CACHE)
# Dozens of tiny runs build the same networks: XLA's persistent cache compiles each program once
# per test process instead of once per run (the runs' subprocesses share it). Set before
# TensorFlow starts.
os.environ["TF_XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("TF_XLA_FLAGS"),
                                                    f"--tf_xla_persistent_cache_directory={CACHE / 'xla'}"]))


def tiny_digits(count, rng):
    """Blurry strokes, so a few epochs learn something, as uint8 28x28 images with labels."""
    labels = rng.integers(0, 10, count).astype(np.uint8)
    rows, cols = np.mgrid[0:28, 0:28]
    images = np.zeros((count, 28, 28), np.float32)
    for i, label in enumerate(labels):
        angle = label * np.pi / 10 + rng.normal(0, 0.1)
        distance = np.abs((rows - 14) * np.cos(angle) - (cols - 14) * np.sin(angle))
        images[i] = np.exp(-distance**2 / 4) * (np.hypot(rows - 14, cols - 14) < 11)
    return (images * 255).astype(np.uint8), labels


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory):
    """256 training and 64 test images of tiny_digits in an .npz file like MNIST's."""
    rng, path = np.random.default_rng(0), tmp_path_factory.mktemp("data") / "tiny.npz"
    (x_train, y_train), (x_test, y_test) = tiny_digits(256, rng), tiny_digits(64, rng)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


@pytest.fixture(scope="session")
def real_mnist():
    """The full MNIST ($MNIST_NPZ or Keras' cache); CI must have it, elsewhere its tests are
    skipped."""
    if not REAL_MNIST.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{REAL_MNIST} is missing: CI must run the real-data tests (set MNIST_NPZ)")
        pytest.skip(f"{REAL_MNIST} not found (set MNIST_NPZ to an mnist.npz)")
    return REAL_MNIST


QUICK = ["--epochs", "2", "--batch-size", "32", "--fid", "pixel,classifier", "--fid-samples", "64", "--iw-samples", "8"]


# Runs in this process draw their figures at a third of plot_utils.DPI, an eighth of a run's time
# saved: what the figures show is tested at full resolution (test_plot_utils.py).
RUN_FIGURE_DPI = 40


def run_main(script, *args):
    """The script's main() in this process, as the command line would call it: everything but
    TensorFlow's start-up. Returns what subprocess.run would (returncode, stdout, stderr)."""
    import conv_vae
    import plot_utils
    import vae

    architecture = {"vae.py": vae.DENSE, "conv_vae.py": conv_vae.CONV}[script]
    stdout, stderr = io.StringIO(), io.StringIO()
    dpi, plot_utils.DPI = plot_utils.DPI, RUN_FIGURE_DPI
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = vae.main(list(map(str, args)), architecture)
        except SystemExit as exit_:
            code = exit_.code
        finally:
            plot_utils.DPI = dpi
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def run_ok(script, *args):
    """run_main of a run that must succeed."""
    result = run_main(script, *args)
    assert result.returncode == 0, result.stderr
    return result


def error_lines(stderr):
    """Our own stderr lines, without TensorFlow's start-up log noise."""
    noise = ("WARNING: All log messages", "I0000", "W0000", "E0000", "To enable the following instructions")
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(noise)]


def pytest_configure(config):
    # Keras' own save_weights trips this NumPy 2 deprecation once per variable; nothing of ours.
    config.addinivalue_line("filterwarnings", "ignore:__array__ implementation doesn't accept a copy keyword")


def pytest_collection_modifyitems(items):
    """The tests on the full MNIST first: they are among the longest (a run on 10,000 real
    digits), and a worker that started them last would leave the other idle at the end."""
    items.sort(key=lambda item: "real_mnist" not in item.fixturenames)


@contextlib.contextmanager
def shared_between_workers(tmp_path_factory, name):
    """A folder every pytest-xdist worker of this session sees, held under a lock: what one worker
    builds there (a trained run, the MNIST classifier), the others find instead of building it
    again."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    folder = root / f"shared-{name}"
    folder.mkdir(exist_ok=True)
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield folder


def shared_run(tmp_path_factory, script, *args):
    """A finished run of script with args, trained once per session and copied into this
    worker's own folder: (results directory, what run_main returned for it)."""
    digest = hashlib.sha256()
    for arg in args:  # a data file by its content: each worker writes its own copy
        digest.update(Path(arg).read_bytes() if isinstance(arg, Path) else str(arg).encode())
    key = digest.hexdigest()[:12]
    with shared_between_workers(tmp_path_factory, f"{Path(script).stem}-{key}") as shared:
        if not (shared / "result.txt").is_file():
            result = run_ok(script, "--results-dir", shared / "run", *args)
            (shared / "stdout.txt").write_text(result.stdout)
            (shared / "result.txt").write_text(result.stderr)
        results_dir = tmp_path_factory.mktemp("run") / Path(script).stem
        shutil.copytree(shared / "run", results_dir)
        result = subprocess.CompletedProcess(args, 0, (shared / "stdout.txt").read_text(),
                                             (shared / "result.txt").read_text())
    return results_dir, result


@pytest.fixture(scope="session")
def random_weights_file(tmp_path_factory):
    """A weights file of InceptionV3 with random weights, the offline stand-in for ImageNet's:
    built once per session (a build takes seconds), read by every worker."""
    import fid

    with shared_between_workers(tmp_path_factory, "random-inception") as folder:
        path = folder / "random_inception.weights.h5"
        if not path.is_file():
            model = fid.load_inception(None)
            model.save_weights(path)
            _random_inception[path] = model  # this worker's random_inception, without a rebuild
    return path


_random_inception = {}


@pytest.fixture(scope="session")
def random_inception(random_weights_file):
    """The model of random_weights_file."""
    import fid

    return _random_inception.get(random_weights_file) or fid.load_inception(random_weights_file)
