"""Every figure builds from small synthetic arrays, renders to a valid PNG, and carries the
labels, titles and ticks a reader of the README relies on."""

import struct

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import plot_utils

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    header = path.read_bytes()[:24]
    assert header[:8] == PNG_SIGNATURE
    assert header[12:16] == b"IHDR"
    return struct.unpack(">II", header[16:24])


def render(fig, tmp_path, name="figure.png"):
    assert isinstance(fig, Figure)
    path = tmp_path / name
    fig.savefig(path)
    width, height = png_size(path)
    assert 300 <= width <= 1600 and 100 <= height <= 1600
    return width, height


def assert_nothing_clipped(fig):
    """Every title, label and tick label lies inside the figure on its first draw, the one the
    caller saves (constrained layout around a fixed-aspect image shifts on later draws)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    drawn = fig.get_tightbbox(canvas.get_renderer())  # in inches
    width, height = fig.get_size_inches()
    assert drawn.x0 >= 0 and drawn.y0 >= 0 and drawn.x1 <= width and drawn.y1 <= height


def history(n_epochs):
    rng = np.random.default_rng(0)
    keys = ["loss", "reconstruction_loss", "kl_loss"]
    keys += [f"val_{key}" for key in keys]
    return {key: list(rng.uniform(1, 200, n_epochs)) for key in keys}


def digits(*shape):
    return np.random.default_rng(0).uniform(0, 1, shape + (28, 28))


def tick_texts(labels):
    return [label.get_text() for label in labels]


def as_float(text):
    return float(text.replace("\N{MINUS SIGN}", "-"))


@pytest.mark.parametrize("n_epochs", [1, 12])
def test_loss_curves(tmp_path, n_epochs):
    fig = plot_utils.loss_curves(history(n_epochs), title="Dense VAE", unit="nats per image − 448.7")
    render(fig, tmp_path)
    assert "Dense VAE" in fig.get_suptitle()
    assert [ax.get_title() for ax in fig.axes] == [
        "total",
        "reconstruction",
        "KL divergence",
    ]
    assert fig.axes[0].get_ylabel() == "nats per image − 448.7"
    for ax in fig.axes:
        assert ax.get_xlabel() == "epoch"
        assert len(ax.get_lines()) == 2  # train and test
        ticks = [t for t in ax.get_xticks() if 1 <= t <= n_epochs]
        assert ticks and all(float(t).is_integer() for t in ticks)
    assert tick_texts(fig.axes[0].get_legend().get_texts()) == ["train", "test"]
    if n_epochs == 1:
        assert all(line.get_marker() == "o" for line in fig.axes[0].get_lines())


def test_loss_curves_draw_one_panel_per_listed_term(tmp_path, monkeypatch):
    monkeypatch.setitem(plot_utils.LOSS_PANELS, "tc_loss", "total correlation")
    extra = {**history(5), "tc_loss": [1.0] * 5, "val_tc_loss": [2.0] * 5}
    fig = plot_utils.loss_curves(extra)
    render(fig, tmp_path)
    assert [ax.get_title() for ax in fig.axes] == [
        "total",
        "reconstruction",
        "KL divergence",
        "total correlation",
    ]
    assert all(len(ax.get_lines()) == 2 for ax in fig.axes)
    assert len(plot_utils.loss_curves(history(5)).axes) == 3  # a listed term not in history


def test_interpolation_rows_hold_real_ends_and_the_path(tmp_path):
    rng = np.random.default_rng(0)
    starts, paths, ends = (
        rng.random((4, 28, 28)),
        rng.random((4, 10, 28, 28, 1)),
        rng.random((4, 28, 28)),
    )
    labels = ["0 to 3", "1 to 4", "2 to 5", "3 to 6"]
    fig = plot_utils.interpolation(starts, paths, ends, labels, title="Dense VAE")
    assert_nothing_clipped(fig)
    render(fig, tmp_path)
    ax = fig.axes[0]
    assert fig.get_suptitle().startswith("Dense VAE")
    assert tick_texts(ax.get_xticklabels()) == ["real", "t = 0", "t = 1", "real"]
    assert tick_texts(ax.get_yticklabels()) == labels
    mosaic = ax.get_images()[0].get_array()
    assert mosaic.shape == (4 * 30 - 2, 12 * 30 - 2)
    np.testing.assert_allclose(mosaic[:28, :28], starts[0])
    np.testing.assert_allclose(mosaic[30:58, 11 * 30:11 * 30 + 28], ends[1])
    with pytest.raises(ValueError, match="row labels"):
        plot_utils.interpolation(starts, paths, ends, ["only one"])


def test_interpolation_with_one_row(tmp_path):
    rng = np.random.default_rng(0)
    fig = plot_utils.interpolation(
        rng.random((1, 28, 28)), rng.random((1, 10, 28, 28)), rng.random((1, 28, 28)), ["7 to 1"]
    )
    assert_nothing_clipped(fig)
    render(fig, tmp_path)
    ax = fig.axes[0]
    assert tick_texts(ax.get_yticklabels()) == ["7 to 1"]
    assert ax.get_images()[0].get_array().shape == (28, 12 * 30 - 2)


def test_loss_curves_say_when_the_kl_term_is_weighted(tmp_path):
    weights = [0.0, 2.0, 4.0]
    warmup = {**history(3), "kl_weight": weights, "val_kl_weight": weights}
    fig = plot_utils.loss_curves(warmup)
    render(fig, tmp_path)
    assert fig.axes[0].get_title() == "total (KL weight 0 to 4)"
    constant = {**history(3), "kl_weight": [4.0] * 3, "val_kl_weight": [4.0] * 3}
    constant = plot_utils.loss_curves(constant)
    assert constant.axes[0].get_title() == "total (KL weight 4)"


@pytest.mark.parametrize("n_images", [7, 150])
def test_reconstructions_pairs_up_to_100(tmp_path, n_images):
    originals = digits(n_images)
    fig = plot_utils.reconstructions(originals, originals[..., None], title="Conv")
    render(fig, tmp_path)
    (ax,) = fig.axes
    assert ax.get_title() == "Conv: reconstructions of test digits"
    assert plot_utils.reconstructions(originals, originals, items="images").axes[0].get_title().endswith("test images")
    assert "left original" in ax.get_xlabel()
    assert "right reconstruction" in ax.get_xlabel()
    assert len(ax.get_xticks()) == 0 and len(ax.get_yticks()) == 0
    mosaic = ax.get_images()[0].get_array()
    pairs = min(n_images, 100)
    columns = min(pairs, 10)
    assert mosaic.shape[1] > columns * 56 and mosaic.shape[1] < columns * 64
    assert mosaic.shape[0] >= -(-pairs // 10) * 28


def test_reconstructions_rejects_mismatched_counts():
    with pytest.raises(ValueError):
        plot_utils.reconstructions(digits(5), digits(4))


def test_latent_space_2d(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(20) % 10  # every digit present
    fig = plot_utils.latent_space(rng.normal(size=(20, 2)), labels, title="Dense VAE")
    render(fig, tmp_path)
    ax, colorbar_ax = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("z[0]", "z[1]")
    assert fig.get_suptitle().startswith("Dense VAE")
    assert list(colorbar_ax.get_yticks()) == list(range(10))
    assert tick_texts(colorbar_ax.get_yticklabels()) == [str(d) for d in range(10)]


def test_latent_space_names_fashion_mnist_classes(tmp_path):
    rng = np.random.default_rng(0)
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]
    names += ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    labels = rng.integers(0, 10, 20)  # not every class drawn: every name still gets its colour
    fig = plot_utils.latent_space(rng.normal(size=(20, 2)), labels, class_names=names)
    render(fig, tmp_path)
    colorbar_ax = fig.axes[1]
    assert tick_texts(colorbar_ax.get_yticklabels()) == names
    assert colorbar_ax.get_ylabel() == "class"
    assert "images" in fig.get_suptitle()
    with pytest.raises(ValueError, match="class names"):
        plot_utils.latent_space(rng.normal(size=(20, 2)), labels, class_names=names[:3])


@pytest.mark.parametrize("dim", [1, 2])
def test_latent_space_one_class(tmp_path, dim):
    rng = np.random.default_rng(0)
    fig = plot_utils.latent_space(rng.normal(size=(30, dim)), np.full(30, 3))
    assert_nothing_clipped(fig)
    render(fig, tmp_path)
    ax, colorbar_ax = fig.axes
    assert list(colorbar_ax.get_yticks()) == [0]
    assert tick_texts(colorbar_ax.get_yticklabels()) == ["3"]
    assert len(set(map(tuple, ax.collections[0].get_facecolors()))) == 1
    if dim == 1:
        assert tick_texts(ax.get_yticklabels()) == ["3"]


def test_latent_space_colours_only_the_classes_present(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array([2, 5, 7] * 10)
    fig = plot_utils.latent_space(rng.normal(size=(30, 2)), labels)
    render(fig, tmp_path)
    ax, colorbar_ax = fig.axes
    assert tick_texts(colorbar_ax.get_yticklabels()) == ["2", "5", "7"]
    assert len(set(map(tuple, ax.collections[0].get_facecolors()))) == 3


def test_latent_space_pca_for_5d(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(500, 5)) * [5, 2, 1, 1, 1]
    fig = plot_utils.latent_space(z, rng.integers(0, 10, 500))
    render(fig, tmp_path)
    ax = fig.axes[0]
    assert "PCA" in fig.get_suptitle() and "5-d" in fig.get_suptitle()
    assert ax.get_xlabel().startswith("PC 1")
    assert ax.get_ylabel().startswith("PC 2")
    x, y = ax.collections[0].get_offsets().T
    assert np.var(x) > np.var(y)  # the first component carries the most variance


def test_latent_space_1d(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 50)
    fig = plot_utils.latent_space(rng.normal(size=(50, 1)), labels)
    render(fig, tmp_path)
    ax, colorbar_ax = fig.axes
    assert ax.get_xlabel() == "z[0]"
    assert "jitter" in ax.get_ylabel()
    y = ax.collections[0].get_offsets()[:, 1]
    assert np.all(np.abs(y - labels) < 0.5)  # each point stays at its digit's row
    assert list(colorbar_ax.get_yticks()) == list(range(10))


@pytest.mark.parametrize("n", [10, 30])
def test_manifold_ticks_match_grid(tmp_path, n):
    grid_values = np.linspace(-4, 4, n)
    fig = plot_utils.manifold(digits(n, n)[..., None], grid_values, title="Dense VAE")
    render(fig, tmp_path)
    (ax,) = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("z[0]", "z[1]")
    assert ax.get_title().startswith("Dense VAE")
    image = ax.get_images()[0]
    assert image.get_array().shape == (n * 28, n * 28)
    half_cell = 4 / (n - 1)  # each grid value is the centre of its cell
    extent = [-4 - half_cell, 4 + half_cell]
    assert np.allclose(image.get_extent(), extent + extent)  # (left, right, bottom, top)
    assert np.allclose(ax.get_xlim(), extent) and np.allclose(ax.get_ylim(), extent)
    assert not ax.yaxis.get_inverted()  # z[1] grows upwards
    for axis in (ax.xaxis, ax.yaxis):
        shown = [
            (tick, label)
            for tick, label in zip(axis.get_ticklocs(), axis.get_ticklabels())
            if extent[0] <= tick <= extent[1]
        ]
        ticks = [tick for tick, _ in shown]
        labels = [as_float(label.get_text()) for _, label in shown]
        assert 4 <= len(ticks) <= 12
        assert np.allclose(labels, ticks)  # labels read the latent coordinate itself
        assert min(labels) >= -4 and max(labels) <= 4  # within the grid range
        assert labels == [-v for v in labels[::-1]]  # symmetric grid, symmetric ticks


def test_manifold_places_decodings_by_grid_position():
    images = np.zeros((3, 3, 28, 28))
    images[0, 2] = 1.0  # z = (largest z[0], largest z[1])
    fig = plot_utils.manifold(images, np.array([-1.0, 0.0, 1.0]))
    ax = fig.axes[0]
    mosaic = ax.get_images()[0].get_array()
    assert mosaic[:28, 56:].min() == 1.0 and mosaic[28:, :].max() == 0.0
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., 0]
    for z, value in [((1.0, 1.0), 255), ((-1.0, 1.0), 0), ((1.0, -1.0), 0)]:
        x, y = ax.transData.transform(z)  # the cell drawn at this latent point
        assert pixels[round(pixels.shape[0] - y), round(x)] == value
    with pytest.raises(ValueError, match="evenly spaced"):
        plot_utils.manifold(images, np.array([-1.0, 0.5, 1.0]))


def test_samples(tmp_path):
    fig = plot_utils.samples(digits(100), title="Dense VAE")
    render(fig, tmp_path)
    (ax,) = fig.axes
    assert ax.get_title().startswith("Dense VAE")
    assert len(ax.get_xticks()) == 0 and len(ax.get_yticks()) == 0
    rows, columns = ax.get_images()[0].get_array().shape
    assert rows == columns  # 10 x 10


def test_progress_animation_labels_each_epoch_and_each_row():
    rng = np.random.default_rng(0)
    digits = rng.random((20, 28, 28))
    frame = plot_utils.progress_frame(digits[:10], digits[:10], digits)
    rows = ["test", "decoded", "prior", "prior"]
    plain, labelled = (plot_utils.progress_animation([frame, frame], row_labels=labels) for labels in ((), rows))
    assert len(labelled) == 2 and labelled[0].size == (plain[0].size[0] + 6 * 7 + 8, plain[0].size[1])
    margin = np.asarray(labelled[0])[16:, :6 * 7 + 8]
    bands = np.array_split(margin, len(rows))  # one label in each row's band
    assert all(band.max() > 200 for band in bands)  # white text, antialiased
    assert np.asarray(plain[0])[:16].max() > 200  # "epoch 1" above the grid


FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@pytest.mark.parametrize("names", [list("0123456789"), FASHION])
def test_conditional_samples_name_each_row_by_its_class(tmp_path, names):
    images = digits(10, 6)
    fig = plot_utils.conditional_samples(images, names, title="Dense VAE")
    assert_nothing_clipped(fig)
    render(fig, tmp_path)
    ax = fig.axes[0]
    assert tick_texts(ax.get_yticklabels()) == names and fig.get_suptitle().startswith("Dense VAE")
    mosaic = ax.get_images()[0].get_array()
    np.testing.assert_allclose(mosaic[30:58, 30:58], images[1, 1])  # class 1's second sample
    with pytest.raises(ValueError, match="labels"):
        plot_utils.conditional_samples(images, names[:3])


def test_analogies_put_the_test_image_first_and_name_each_label_column(tmp_path):
    originals, decoded = digits(4), digits(4, 10)
    fig = plot_utils.analogies(originals, decoded, list("0123456789"), title="Dense VAE")
    assert_nothing_clipped(fig)
    render(fig, tmp_path)
    ax = fig.axes[0]
    assert tick_texts(ax.get_xticklabels()) == ["test", *"0123456789"]
    mosaic = ax.get_images()[0].get_array()
    np.testing.assert_allclose(mosaic[30:58, :28], originals[1])
    np.testing.assert_allclose(mosaic[30:58, 30 * 4:30 * 4 + 28], decoded[1, 3])
    with pytest.raises(ValueError, match="rows of decodings"):
        plot_utils.analogies(originals[:2], decoded, list("0123456789"))


def test_class_manifolds_draw_one_labelled_panel_per_class(tmp_path):
    grid = np.linspace(-4, 4, 5)
    fig = plot_utils.class_manifolds(digits(10, 5, 5), grid, list("0123456789"), title="Dense VAE")
    assert_nothing_clipped(fig)
    render(fig, tmp_path)
    assert [ax.get_title() for ax in fig.axes] == list("0123456789")
    assert [ax.get_xlabel() for ax in fig.axes[5:]] == ["z[0]"] * 5 and fig.axes[0].get_ylabel() == "z[1]"
    assert fig.axes[0].get_images()[0].get_extent() == [-5.0, 5.0, -5.0, 5.0]
    with pytest.raises(ValueError, match="class names"):
        plot_utils.class_manifolds(digits(10, 5, 5), grid, list("012"))


def test_study_history_draws_each_trial_the_best_so_far_and_the_pruned(tmp_path):
    values = [20.0, np.nan, 18.5, 19.0, np.nan, 14.2, 15.0, 13.0]
    pruned = [None, "time", None, None, "loss", None, None, None]
    over_budget = [False] * 7 + [True]  # complete, but its epochs ran over the time budget
    fig = plot_utils.study_history(values, pruned, "pixel FID recon",
                                   importances={"learning-rate": 0.6, "hidden-dim": 0.3,
                                                "beta": 0.1}, title="dense-budget",
                                   over_budget=over_budget)
    render(fig, tmp_path)
    assert_nothing_clipped(fig)
    history, shares = fig.axes
    assert (history.get_xlabel(), history.get_ylabel()) == ("trial", "pixel FID recon")
    lines = {line.get_label(): line for line in history.get_lines()}
    assert list(lines["best so far"].get_ydata()) == [20.0, 20.0, 18.5, 18.5, 18.5, 14.2, 14.2,
                                                      14.2]
    assert list(lines["complete, over the time budget"].get_xdata()) == [7]
    assert list(lines["pruned: over the time budget"].get_xdata()) == [1]
    assert list(lines["pruned: test loss"].get_xdata()) == [4]
    assert [tick.get_text() for tick in shares.get_yticklabels()] == [
        "beta", "hidden-dim", "learning-rate"]  # the most important on top
    assert len(plot_utils.study_history([1.0, 2.0], [None, None], "test ELBO",
                                        lower_is_better=False).axes) == 1
