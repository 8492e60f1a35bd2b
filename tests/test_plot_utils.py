"""Every figure renders to a PNG with nothing clipped, draws the digits it is given where a reader
looks for them, and carries the labels, titles and ticks a reader of the README relies on."""

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

import plot_utils

RNG = np.random.default_rng(0)
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot"]


def render(fig, tmp_path):
    """Checks that every label lies inside the figure on its first draw, the one the caller saves
    (constrained layout around a fixed-aspect image shifts on later draws), then that the figure
    saves as a PNG of a sensible size. Returns the red channel of that first draw."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., 0].copy()
    drawn = fig.get_tightbbox(canvas.get_renderer())  # in inches
    assert np.all(drawn.min >= 0) and np.all(drawn.max <= fig.get_size_inches())
    fig.savefig(tmp_path / "figure.png")
    with Image.open(tmp_path / "figure.png") as image:
        assert image.format == "PNG" and 300 <= image.width <= 1600 and 100 <= image.height <= 1600
    return pixels


def tiling(cells, gap=2):
    """What a mosaic of cells (rows, columns, h, w) must be: the cells in order, row by row,
    `gap` mid-gray pixels apart."""
    rows, columns, h, w = cells.shape
    padded = np.pad(cells, ((0, 0), (0, 0), (0, gap), (0, gap)), constant_values=0.5)
    mosaic = padded.transpose(0, 2, 1, 3).reshape(rows * (h + gap), columns * (w + gap))
    return mosaic[: rows * (h + gap) - gap, : columns * (w + gap) - gap]


def mosaic_of(ax):
    """The one image ax draws, after checking it is drawn white on black from values in [0, 1]."""
    (image,) = ax.get_images()
    assert image.get_cmap().name == "gray" and image.get_clim() == (0.0, 1.0)
    return image.get_array()


def history(n_epochs, terms=("reconstruction", "kl")):
    keys = ["loss", *(f"{term}_loss" for term in terms)]
    return {p + key: list(RNG.uniform(1, 200, n_epochs)) for p in ("", "val_") for key in keys}


def digits(*shape):
    return RNG.uniform(0, 1, shape + (28, 28))


def tick_texts(labels):
    return [label.get_text() for label in labels]


@pytest.mark.parametrize("n_epochs", [1, 12, 3280])
def test_loss_curves(tmp_path, n_epochs):
    fig = plot_utils.loss_curves(history(n_epochs), title="Dense", unit="nats per image − 448.7")
    render(fig, tmp_path)
    assert fig.get_suptitle() == "Dense: loss per epoch"
    assert [ax.get_title() for ax in fig.axes] == ["total", "reconstruction", "KL divergence"]
    assert fig.axes[0].get_ylabel() == "nats per image − 448.7"
    for ax in fig.axes:
        assert ax.get_xlabel() == "epoch"
        markers = [line.get_marker() for line in ax.get_lines()]  # train and test
        assert markers == ["o" if n_epochs <= 30 else "None"] * 2
        ticks = [t for t in ax.get_xticks() if 1 <= t <= n_epochs]
        assert ticks and all(float(t).is_integer() for t in ticks)
        shown = sorted((label.get_window_extent() for label in ax.get_xticklabels()
                        if label.get_visible() and label.get_text()), key=lambda box: box.x0)
        assert all(left.x1 < right.x0 for left, right in zip(shown, shown[1:]))  # none overlap
    assert tick_texts(fig.axes[0].get_legend().get_texts()) == ["train", "test"]


def test_loss_curves_draw_a_panel_per_loss_term_and_say_how_kl_is_weighted(tmp_path):
    losses = {**history(3, terms=("reconstruction", "kl", "tc")), "kl_weight": [0.0, 2.0, 4.0],
              "val_kl_weight": [0.0, 2.0, 4.0]}
    fig = plot_utils.loss_curves(losses)
    render(fig, tmp_path)
    assert [ax.get_title() for ax in fig.axes] == [
        "total (KL weight 0 to 4)", "reconstruction", "KL divergence", "tc"]  # none for kl_weight
    train, test = fig.axes[3].get_lines()
    assert (list(train.get_ydata()), list(test.get_ydata())) == (losses["tc_loss"],
                                                                 losses["val_tc_loss"])
    constant = plot_utils.loss_curves({**history(3), "kl_weight": [4.0] * 3})
    assert constant.axes[0].get_title() == "total (KL weight 4)"


@pytest.mark.parametrize("rows", [1, 4])
def test_interpolation_rows_hold_real_ends_and_the_path(tmp_path, rows):
    starts, paths, ends = digits(rows), digits(rows, 10), digits(rows)
    labels = [f"{row} to {row + 3}" for row in range(rows)]
    fig = plot_utils.interpolation(starts, paths[..., None], ends, labels, title="Dense")
    render(fig, tmp_path)
    ax = fig.axes[0]
    assert fig.get_suptitle() == "Dense: latent interpolations between test images"
    assert tick_texts(ax.get_xticklabels()) == ["real", "t = 0", *[""] * 8, "t = 1", "real"]
    assert tick_texts(ax.get_yticklabels()) == labels
    cells = np.concatenate([starts[:, None], paths, ends[:, None]], axis=1)
    np.testing.assert_array_equal(mosaic_of(ax), tiling(cells))
    with pytest.raises(ValueError, match="row and column labels"):
        plot_utils.interpolation(starts, paths, ends, labels + ["one too many"])


@pytest.mark.parametrize("n_images", [7, 150])
def test_reconstructions_pair_each_of_the_first_100_with_its_reconstruction(tmp_path, n_images):
    originals, reconstructed = digits(n_images), digits(n_images)
    fig = plot_utils.reconstructions(originals, reconstructed[..., None], title="Conv")
    render(fig, tmp_path)
    (ax,) = fig.axes
    assert ax.get_title() == "Conv: reconstructions of test digits"
    assert ax.get_xlabel() == "each pair: left original, right reconstruction"
    assert len(ax.get_xticks()) == 0 and len(ax.get_yticks()) == 0
    pairs = np.concatenate([originals, reconstructed], axis=2)[:100]  # 7 in a row, or 10 x 10
    np.testing.assert_array_equal(mosaic_of(ax),
                                  tiling(pairs.reshape(-1, min(10, n_images), 28, 56), gap=4))
    titled = plot_utils.reconstructions(originals, originals, items="images")
    assert titled.axes[0].get_title().endswith("test images")
    with pytest.raises(ValueError):
        plot_utils.reconstructions(originals[:5], originals[:4])


@pytest.mark.parametrize("n, side", [(100, 10), (7, 3)])
def test_samples_tile_the_digits_in_order(tmp_path, n, side):
    images = digits(n)
    fig = plot_utils.samples(images[..., None], title="Dense VAE")
    render(fig, tmp_path)
    (ax,) = fig.axes
    assert ax.get_title() == "Dense VAE: samples from the prior"
    assert len(ax.get_xticks()) == 0 and len(ax.get_yticks()) == 0
    cells = np.concatenate([images, np.full((side * side - n, 28, 28), 0.5)])  # empty cells
    np.testing.assert_array_equal(mosaic_of(ax), tiling(cells.reshape(side, side, 28, 28)))


@pytest.mark.parametrize("dim, present", [(2, [2, 5, 7]), (2, [3]), (1, [3])])
def test_latent_space_colours_only_the_digits_present(tmp_path, dim, present):
    fig = plot_utils.latent_space(RNG.normal(size=(30, dim)), present * (30 // len(present)))
    render(fig, tmp_path)
    ax, colorbar_ax = fig.axes
    assert list(colorbar_ax.get_yticks()) == list(range(len(present)))
    assert tick_texts(colorbar_ax.get_yticklabels()) == [str(d) for d in present]
    assert colorbar_ax.get_ylabel() == "digit"
    assert len(set(map(tuple, ax.collections[0].get_facecolors()))) == len(present)


def test_latent_space_names_fashion_mnist_classes(tmp_path):
    labels = RNG.integers(0, 10, 20)  # not every class drawn: every name still gets its colour
    fig = plot_utils.latent_space(RNG.normal(size=(20, 2)), labels, "Conv", class_names=FASHION)
    render(fig, tmp_path)
    ax, colorbar_ax = fig.axes
    assert fig.get_suptitle() == "Conv: latent means of test images"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("z[0]", "z[1]")
    assert tick_texts(colorbar_ax.get_yticklabels()) == FASHION
    assert colorbar_ax.get_ylabel() == "class"
    with pytest.raises(ValueError, match="class names"):
        plot_utils.latent_space(RNG.normal(size=(20, 2)), labels, class_names=FASHION[:3])


def test_latent_space_spreads_a_1d_latent_by_digit_and_projects_a_5d_one_by_pca(tmp_path):
    labels = RNG.permutation(np.arange(50) % 10)  # every digit, so every tick
    fig = plot_utils.latent_space(RNG.normal(size=(50, 1)), labels)
    render(fig, tmp_path)
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("z[0]", "digit label (jittered)")
    assert tick_texts(ax.get_yticklabels()) == [str(d) for d in range(10)]
    y = ax.collections[0].get_offsets()[:, 1]
    assert np.all(np.abs(y - labels) < 0.5)  # each point stays at its digit's row
    z = RNG.normal(size=(500, 5)) * [5, 2, 1, 1, 1]
    fig = plot_utils.latent_space(z, RNG.integers(0, 10, 500))
    render(fig, tmp_path)
    ax = fig.axes[0]
    assert fig.get_suptitle() == "VAE: PCA projection of the 5-d latent means"
    assert ax.get_xlabel().startswith("PC 1") and ax.get_ylabel().startswith("PC 2")
    x, y = ax.collections[0].get_offsets().T
    assert np.var(x) > np.var(y)  # the first component carries the most variance


@pytest.mark.parametrize("n", [10, 30])
def test_manifold_ticks_read_the_latent_grid(tmp_path, n):
    fig = plot_utils.manifold(digits(n, n)[..., None], np.linspace(-4, 4, n), title="Dense VAE")
    render(fig, tmp_path)
    (ax,) = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == (
        "z[0]", "z[1]", "Dense VAE: decoded latent grid")
    assert mosaic_of(ax).shape == (n * 28, n * 28)
    extent = [-4 - 4 / (n - 1), 4 + 4 / (n - 1)]  # each grid value is the centre of its cell
    assert np.allclose(ax.get_images()[0].get_extent(), extent * 2)  # left, right, bottom, top
    assert np.allclose(ax.get_xlim(), extent) and np.allclose(ax.get_ylim(), extent)
    for axis in (ax.xaxis, ax.yaxis):
        shown = [(tick, float(label.get_text().replace("\N{MINUS SIGN}", "-")))
                 for tick, label in zip(axis.get_ticklocs(), axis.get_ticklabels())
                 if extent[0] <= tick <= extent[1]]
        ticks, labels = zip(*shown)
        assert 4 <= len(ticks) <= 12
        assert np.allclose(labels, ticks)  # labels read the latent coordinate itself
        assert labels == tuple(-v for v in labels[::-1])  # symmetric grid, symmetric ticks


def test_manifold_places_decodings_by_grid_position(tmp_path):
    images = np.zeros((3, 3, 28, 28))
    images[0, 2] = 1.0  # z = (largest z[0], largest z[1])
    fig = plot_utils.manifold(images, np.array([-1.0, 0.0, 1.0]))
    pixels = render(fig, tmp_path)
    ax = fig.axes[0]
    for z, value in [((1.0, 1.0), 255), ((-1.0, 1.0), 0), ((1.0, -1.0), 0)]:
        x, y = ax.transData.transform(z)  # the cell drawn at this latent point
        assert pixels[round(pixels.shape[0] - y), round(x)] == value
    with pytest.raises(ValueError, match="evenly spaced"):
        plot_utils.manifold(images, np.array([-1.0, 0.5, 1.0]))


def test_progress_animation_labels_each_epoch_and_each_row():
    originals, reconstructed, samples = digits(10), digits(10), digits(20)
    frame = plot_utils.progress_frame(originals, reconstructed[..., None], samples)
    cells = np.concatenate([originals, reconstructed, samples]).reshape(4, 10, 28, 28)
    assert frame.dtype == np.uint8 and np.array_equal(frame, np.round(255 * tiling(cells)))
    rows = ["test", "decoded", "prior", "prior"]
    plain, labelled = (plot_utils.progress_animation([frame, frame], [1, 2], row_labels=labels)
                       for labels in ((), rows))
    margin = 6 * len("decoded") + 8
    assert len(labelled) == 2 and labelled[0].size == (plain[0].size[0] + margin, plain[0].size[1])
    bands = np.array_split(np.asarray(labelled[0])[16:, :margin], len(rows))
    assert all(band.max() > 200 for band in bands)  # one label in each row's band, white text
    assert np.asarray(plain[0])[:16].max() > 200  # "epoch 1" above the grid


@pytest.mark.parametrize("names", [list("0123456789"), FASHION])
def test_conditional_samples_name_each_row_by_its_class(tmp_path, names):
    images = digits(10, 6)
    fig = plot_utils.conditional_samples(images, names, title="Dense VAE")
    render(fig, tmp_path)
    ax = fig.axes[0]
    assert fig.get_suptitle() == "Dense VAE: samples of each class"
    assert tick_texts(ax.get_yticklabels()) == names
    np.testing.assert_array_equal(mosaic_of(ax), tiling(images))
    with pytest.raises(ValueError, match="labels"):
        plot_utils.conditional_samples(images, names[:3])


def test_analogies_put_the_test_image_first_and_name_each_label_column(tmp_path):
    originals, decoded = digits(4), digits(4, 10)
    fig = plot_utils.analogies(originals, decoded, list("0123456789"), title="Dense VAE")
    render(fig, tmp_path)
    ax = fig.axes[0]
    assert tick_texts(ax.get_xticklabels()) == ["test", *"0123456789"]
    cells = np.concatenate([originals[:, None], decoded], axis=1)
    np.testing.assert_array_equal(mosaic_of(ax), tiling(cells))
    with pytest.raises(ValueError):
        plot_utils.analogies(originals[:2], decoded, list("0123456789"))


def test_class_manifolds_draw_one_labelled_panel_per_class(tmp_path):
    grid, images = np.linspace(-4, 4, 5), digits(10, 5, 5)
    fig = plot_utils.class_manifolds(images, grid, list("0123456789"), title="Dense VAE")
    render(fig, tmp_path)
    assert fig.get_suptitle() == "Dense VAE: decoded latent grid of each class"
    assert [ax.get_title() for ax in fig.axes] == list("0123456789")
    assert [ax.get_xlabel() for ax in fig.axes] == [""] * 5 + ["z[0]"] * 5
    assert [ax.get_ylabel() for ax in fig.axes] == ["z[1]", "", "", "", ""] * 2
    for ax, panel in zip(fig.axes, images):
        assert ax.get_images()[0].get_extent() == [-5.0, 5.0, -5.0, 5.0]
        np.testing.assert_array_equal(mosaic_of(ax), tiling(panel, gap=0))
    with pytest.raises(ValueError, match="class names"):
        plot_utils.class_manifolds(images, grid, list("012"))


def test_study_history_draws_each_trial_the_best_so_far_and_the_pruned(tmp_path):
    values = [20.0, np.nan, 18.5, 19.0, np.nan, 14.2, 15.0, 13.0]
    pruned = [None, "time", None, None, "loss", None, None, None]
    over_budget = [False] * 7 + [True]  # complete, but its epochs ran over the time budget
    importances = {"learning-rate": 0.6, "hidden-dim": 0.3, "beta": 0.1}
    fig = plot_utils.study_history(values, pruned, "pixel FID recon", importances=importances,
                                   title="dense-budget", over_budget=over_budget)
    render(fig, tmp_path)
    trials, shares = fig.axes
    assert trials.get_title() == "dense-budget: pixel FID recon by trial"
    assert (trials.get_xlabel(), trials.get_ylabel()) == ("trial", "pixel FID recon")
    lines = {line.get_label(): line for line in trials.get_lines()}
    assert {label: list(line.get_xdata()) for label, line in lines.items()} == {
        "complete trial": [0, 2, 3, 5, 6], "complete, over the time budget": [7],
        "best so far": list(range(8)), "pruned: test loss": [4],
        "pruned: over the time budget": [1]}
    assert list(lines["best so far"].get_ydata()) == [20, 20, 18.5, 18.5, 18.5, 14.2, 14.2, 14.2]
    assert tick_texts(shares.get_yticklabels()) == ["beta", "hidden-dim", "learning-rate"]
    rising = plot_utils.study_history([1.0, 2.0], [None, None], "test ELBO", lower_is_better=False)
    (ax,) = rising.axes  # no importances, no second panel
    assert [list(line.get_ydata()) for line in ax.get_lines()] == [[1.0, 2.0], [1.0, 2.0]]
