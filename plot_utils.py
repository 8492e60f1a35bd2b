"""Every figure of the project, and only figures.

Each function builds and returns a `matplotlib.figure.Figure` from arrays the caller computed;
saving and closing it is the caller's job. Figures are made with `Figure` directly (not pyplot) so
that none is left open in pyplot's registry and no window ever opens.
"""

import math

import matplotlib
import numpy as np
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 120
DIGITS = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}  # white on black, as MNIST stores them
GAP_VALUE = 0.5  # mid-gray separators stand out against black digit backgrounds
# Panel titles of the loss terms whose name (history key <term>_loss) is too terse; any other
# term's panel is titled by its name.
TERM_TITLES = {"kl": "KL divergence"}


def _new_figure(width, height, layout="constrained"):
    return Figure(figsize=(width, height), dpi=DPI, layout=layout)


def _as_images(images, ndim):
    """Float array with any trailing channel axis of size 1 dropped, so (N, 28, 28) and
    (N, 28, 28, 1) are both accepted."""
    images = np.asarray(images, dtype=float)
    if images.ndim == ndim + 1 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != ndim:
        raise ValueError(f"expected {ndim}-d images, got shape {images.shape}")
    return images


def _tile(cells, ncols, gap):
    """One mosaic image of `cells` (N, h, w) in rows of `ncols`, separated by `gap` pixels of
    GAP_VALUE; one imshow is much faster and crisper than one axes per image."""
    n, h, w = cells.shape
    mosaic = np.full((math.ceil(n / ncols) * (h + gap) - gap, ncols * (w + gap) - gap), GAP_VALUE)
    for k, cell in enumerate(cells):
        row, col = divmod(k, ncols)
        top, left = row * (h + gap), col * (w + gap)
        mosaic[top : top + h, left : left + w] = cell
    return mosaic


def _show_digits(ax, mosaic):
    ax.imshow(mosaic, **DIGITS)
    ax.set(xticks=[], yticks=[])


def _class_colours(count):
    """`count` qualitative colours, tab10's or tab20's while they suffice (they tell classes apart
    best), else evenly spaced along turbo."""
    for name in ("tab10", "tab20"):
        colours = matplotlib.colormaps[name].colors
        if count <= len(colours):
            return colours[:count]
    return matplotlib.colormaps["turbo"](np.linspace(0, 1, count))


def loss_curves(history, title="VAE", unit="loss per image"):
    """Train and test loss per epoch: the total ("loss"), then one panel per term of the loss
    (each `<term>_loss` key of history, its `val_` twin the test curve), since the KL term is an
    order of magnitude smaller than the total and would look flat on a shared axis. The total's
    title says what it sums when the KL term is weighted (kl_weight: --beta, --kl-warmup-epochs).
    unit: the y axis' label."""
    terms = [key for key in history if key.endswith("_loss") and not key.startswith("val_")]
    keys = ["loss", *terms]
    fig = _new_figure(2.4 * len(keys), 2.8)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    n_epochs = len(history["loss"])
    epochs = np.arange(1, n_epochs + 1)
    marker = "o" if n_epochs <= 30 else None  # a single epoch is a lone point
    total = "total"
    if "kl_weight" in history:
        low, high = min(history["kl_weight"]), max(history["kl_weight"])
        total += f" (KL weight {high:g})" if low == high else f" (KL weight {low:g} to {high:g})"
    for ax, key in zip(axes, keys):
        ax.plot(epochs, history[key], marker=marker, ms=4, label="train")
        ax.plot(epochs, history[f"val_{key}"], marker=marker, ms=4, label="test")
        term = key.removesuffix("_loss")
        ax.set_title(total if key == "loss" else TERM_TITLES.get(term, term))
        ax.set_xlabel("epoch")
        ax.set_xlim(0.5, n_epochs + 0.5)  # room for a lone first/last point
        ax.xaxis.set_major_locator(MaxNLocator(nbins=7 if n_epochs < 1000 else 4, integer=True,
                                               steps=[1, 2, 5, 10], min_n_ticks=1))  # 4 digits wide
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
        ax.grid(alpha=0.3)
    axes[0].legend(frameon=False)  # same colours in every panel
    axes[0].set_ylabel(unit)
    fig.suptitle(f"{title}: loss per epoch")
    return fig


def reconstructions(originals, reconstructions, title="VAE", items="digits"):
    """The first 100 test digits, each beside its reconstruction, in a grid of up to 10 x 10
    pairs, so errors can be judged digit by digit. items names them in the title ("images" for
    a dataset of other things)."""
    originals = _as_images(originals, 3)[:100]
    reconstructed = _as_images(reconstructions, 3)[:100]
    if originals.shape != reconstructed.shape:
        raise ValueError(f"{originals.shape[0]} originals but {reconstructed.shape[0]} "
                         "reconstructions, or different image sizes")
    pairs = np.concatenate([originals, reconstructed], axis=2)
    mosaic = _tile(pairs, ncols=min(10, len(pairs)), gap=4)
    height, width = mosaic.shape
    fig = _new_figure(6.4, 0.6 + 6.4 * height / width)
    ax = fig.add_subplot()
    _show_digits(ax, mosaic)
    ax.set_title(f"{title}: reconstructions of test {items}")
    ax.set_xlabel("each pair: left original, right reconstruction")
    return fig


def latent_space(z, labels, title="VAE", class_names=None):
    """Encoder means of test images coloured by their class, to show how the classes are laid
    out; latents wider than 2 are projected on their first two principal components, a 1-d latent
    is spread by class on y.

    Without class_names the colours are those of the label values present (digits); with them
    (e.g. Fashion-MNIST's clothing), labels index class_names and every name gets a colour."""
    labels = np.asarray(labels).astype(int).ravel()
    z = np.asarray(z, dtype=float).reshape(len(labels), -1)  # (N,) is one column
    if class_names is None:
        classes, index = np.unique(labels, return_inverse=True)
        names = [str(c) for c in classes]
    elif labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(f"labels must index the {len(class_names)} class names")
    else:
        index, names = labels, list(class_names)
    dim = z.shape[1]
    items = "digits" if class_names is None else "images"
    fig = _new_figure(5.6, 4.8)
    ax = fig.add_subplot()
    if dim == 1:
        jitter = np.random.default_rng(0).uniform(-0.35, 0.35, len(z))
        x, y = z[:, 0], index + jitter
        ax.set_xlabel("z[0]")
        ax.set_ylabel("digit label (jittered)" if class_names is None else "class (jittered)")
        ax.set_yticks(range(len(names)), names)
        fig.suptitle(f"{title}: 1-d latent means of test {items}")
    elif dim == 2:
        x, y = z[:, 0], z[:, 1]
        ax.set_xlabel("z[0]")
        ax.set_ylabel("z[1]")
        fig.suptitle(f"{title}: latent means of test {items}")
    else:
        centred = z - z.mean(axis=0)
        _, singular_values, components = np.linalg.svd(centred, full_matrices=False)
        x, y = (centred @ components[:2].T).T
        explained = singular_values**2 / np.sum(singular_values**2)
        ax.set_xlabel(f"PC 1 ({explained[0]:.0%} of variance)")
        ax.set_ylabel(f"PC 2 ({explained[1]:.0%} of variance)")
        fig.suptitle(f"{title}: PCA projection of the {dim}-d latent means")
    points = ax.scatter(x, y, c=index, cmap=ListedColormap(_class_colours(len(names))),
                        norm=BoundaryNorm(np.arange(len(names) + 1) - 0.5, ncolors=len(names)),
                        s=np.clip(4000 / len(z), 2, 30),  # small for 10k points, visible for 20
                        alpha=0.6, linewidths=0)
    colorbar = fig.colorbar(points, ax=ax)
    colorbar.set_ticks(range(len(names)), labels=names)
    colorbar.set_label("digit" if class_names is None else "class")
    colorbar.ax.minorticks_off()
    colorbar.solids.set_alpha(1)  # the bar shows the colours, not the overlap
    return fig


def _latent_grid(ax, images, grid_values):
    """Draws manifold's images (n, n, h, w) on ax as one image placed at its latent coordinates."""
    n, _, h, w = images.shape
    grid_values = np.asarray(grid_values, dtype=float)
    if images.shape[1] != n or len(grid_values) != n:
        raise ValueError(f"expected ({len(grid_values)}, {len(grid_values)}, h, w) images, got "
                         f"{images.shape}")
    step = (grid_values[-1] - grid_values[0]) / (n - 1) if n > 1 else 1.0
    if step <= 0 or not np.allclose(np.diff(grid_values), step):
        raise ValueError("grid_values must be increasing and evenly spaced")
    low, high = grid_values[0] - step / 2, grid_values[-1] + step / 2
    # The default origin "upper" puts row 0 at the top of the extent, the largest z[1]; the
    # aspect keeps pixels square should h differ from w.
    ax.imshow(images.transpose(0, 2, 1, 3).reshape(n * h, n * w), **DIGITS,
              extent=(low, high, low, high), aspect=h / w)


def manifold(images, grid_values, title="VAE"):
    """Decodings of a regular grid of 2-d latent points tiled into one image placed at its latent
    coordinates, to show how digits morph across the latent plane.

    images[i, j] must decode z = (grid_values[j], grid_values[::-1][i]): columns go left to right
    with z[0], rows top to bottom from the largest z[1] down, like a plot with z[1] upwards.
    grid_values must be increasing and evenly spaced, as each is the centre of one cell."""
    fig = _new_figure(6.0, 6.0)
    ax = fig.add_subplot()
    _latent_grid(ax, _as_images(images, 4), grid_values)
    ax.set(xlabel="z[0]", ylabel="z[1]", title=f"{title}: decoded latent grid")
    return fig


def _labelled_grid(cells, row_labels, column_labels, title, xlabel):
    """cells (rows, columns, h, w) in one mosaic, each row and column named on its axis."""
    rows, columns, h, w = cells.shape
    if len(row_labels) != rows or len(column_labels) != columns:
        raise ValueError(f"{rows} x {columns} cells need as many row and column labels, got "
                         f"{len(row_labels)} and {len(column_labels)}")
    gap = 2
    mosaic = _tile(cells.reshape(-1, h, w), ncols=columns, gap=gap)
    height, width = mosaic.shape
    image_inches = 0.7 + 0.5 * columns  # wide, plus room for the row labels and the titles
    label_inches = 0.08 * max(len(str(label)) for label in row_labels)  # class names need room
    # "compressed" keeps the title and x labels next to this fixed-aspect image, whatever the
    # number of rows, instead of leaving the slack between them.
    fig = _new_figure(0.3 + image_inches + label_inches, 0.8 + image_inches * height / width,
                      layout="compressed")
    ax = fig.add_subplot()
    ax.imshow(mosaic, **DIGITS)
    ax.set_xticks(np.arange(columns) * (w + gap) + (w - 1) / 2, column_labels)
    ax.set_yticks(np.arange(rows) * (h + gap) + (h - 1) / 2, row_labels)
    ax.tick_params(length=0)
    ax.set_xlabel(xlabel)
    fig.suptitle(title)
    return fig


def interpolation(starts, paths, ends, row_labels, title="VAE", conditional=False):
    """Each row: a real test image, the decodings along a straight latent path from its posterior
    mean to another image's (paths: (rows, steps, h, w)), and that other real image, so a reader
    sees how smoothly the model morphs one class into another. conditional: a conditional VAE's
    one-hot label moved along the same path."""
    starts, paths, ends = _as_images(starts, 3), _as_images(paths, 4), _as_images(ends, 3)
    steps = paths.shape[1]
    cells = np.concatenate([starts[:, None], paths, ends[:, None]], axis=1)
    columns = ["real", "t = 0", *[""] * (steps - 2), "t = 1", "real"]
    moved = "z and the label" if conditional else "z"
    xlabel = f"{moved} = (1 - t) left + t right (z: posterior means), {steps} evenly spaced t"
    return _labelled_grid(cells, row_labels, columns,
                          f"{title}: latent interpolations between test images", xlabel)


def progress_frame(originals, reconstructions, samples, columns=10):
    """One frame of training progress as a uint8 image: a row of test images, their
    reconstructions below, then rows of decoded prior samples (the same inputs every epoch, so
    frames compare)."""
    cells = np.concatenate([_as_images(a, 3) for a in (originals, reconstructions, samples)])
    return np.round(255 * np.clip(_tile(cells, ncols=columns, gap=2), 0, 1)).astype(np.uint8)


def progress_animation(frames, epochs, row_labels=(), scale=2):
    """The frames as PIL images (each labelled "epoch N" of epochs, enlarged scale times), ready
    to be saved as one animated GIF. row_labels: one per row of progress_frame's grid, set in a
    margin on the left."""
    from PIL import Image, ImageDraw

    margin = 6 * max(map(len, row_labels), default=0) + 8 * bool(row_labels)  # 6 px a character
    images = []
    for epoch, frame in zip(epochs, frames):
        height, width = frame.shape
        image = Image.new("L", (margin + width * scale, height * scale + 16), 0)
        enlarged = Image.fromarray(frame).resize((width * scale, height * scale), Image.NEAREST)
        image.paste(enlarged, (margin, 16))
        draw = ImageDraw.Draw(image)
        draw.text((4, 2), f"epoch {epoch}", fill=255)
        row_height = height * scale / max(len(row_labels), 1)
        for row, label in enumerate(row_labels):
            draw.text((4, 16 + (row + 0.5) * row_height - 5), label, fill=255)
        images.append(image)
    return images


def samples(images, title="VAE"):
    """Decodings of z ~ N(0, I) in a near-square grid (10 x 10 for 100), to show what the
    generative model produces from its prior."""
    images = _as_images(images, 3)
    fig = _new_figure(4.6, 4.9)
    ax = fig.add_subplot()
    _show_digits(ax, _tile(images, ncols=math.ceil(math.sqrt(len(images))), gap=2))
    ax.set_title(f"{title}: samples from the prior")
    return fig


def conditional_samples(images, class_names, title="VAE"):
    """A conditional VAE's prior samples, one row per class asked for (images: (classes, n, h, w)),
    so a reader sees at once whether each row is the class it names, and how varied it is."""
    images = _as_images(images, 4)
    return _labelled_grid(images, list(class_names), [""] * images.shape[1],
                          f"{title}: samples of each class", "z ~ N(0, I), one row per label")


def analogies(originals, decoded, class_names, title="VAE"):
    """Style transfer by a conditional VAE: each row a test image (first column), then its
    posterior mean decoded with every label (decoded: (rows, classes, h, w)), so the style the
    latent code carries is drawn as each class."""
    originals, decoded = _as_images(originals, 3), _as_images(decoded, 4)
    cells = np.concatenate([originals[:, None], decoded], axis=1)
    return _labelled_grid(cells, [""] * len(originals), ["test", *class_names],
                          f"{title}: each test image's z, decoded with every label",
                          "columns: the label the decoder is given")


def class_manifolds(images, grid_values, class_names, title="VAE"):
    """A conditional VAE's decoded latent grid for each class, one panel per class (images:
    (classes, n, n, h, w), each as manifold's), showing how style varies across z within a
    class."""
    images = _as_images(images, 5)
    if len(class_names) != len(images):
        raise ValueError(f"{len(images)} panels need as many class names, got {len(class_names)}")
    columns = min(5, len(images))
    rows = math.ceil(len(images) / columns)
    fig = _new_figure(2.2 * columns, 2.4 * rows + 0.4)
    for index, (panel, name) in enumerate(zip(images, class_names)):
        ax = fig.add_subplot(rows, columns, index + 1)
        _latent_grid(ax, panel, grid_values)
        ax.set_title(str(name))
        ax.tick_params(labelsize=7)
        if index % columns == 0:
            ax.set_ylabel("z[1]")
        if index >= (rows - 1) * columns:
            ax.set_xlabel("z[0]")
    fig.suptitle(f"{title}: decoded latent grid of each class")
    return fig


def study_history(values, pruned, objective, lower_is_better=True, importances=None,
                  title="study", over_budget=None):
    """A hyper-parameter study trial by trial: each complete trial's objective (values, NaN for
    the others), the best so far, and where trials were pruned (pruned: None, "loss" or "time"
    per trial, drawn as ticks under the points); beside it, the parameters' importances
    ({name: share}) when given, which say what the search learned. A complete trial whose epochs
    ran over the time budget (over_budget: a bool per trial) is drawn hollow and is not a best."""
    values = np.asarray(values, dtype=float)
    numbers = np.arange(len(values))
    fig = _new_figure(9.0 if importances else 5.6, 3.4)
    axes = fig.subplots(1, 2 if importances else 1, squeeze=False,
                        width_ratios=[1.6, 1] if importances else None)[0]
    ax = axes[0]
    over = np.zeros(len(values), bool) if over_budget is None else np.asarray(over_budget, bool)
    done = np.isfinite(values) & ~over
    ax.plot(numbers[done], values[done], "o", ms=4, alpha=0.7, label="complete trial")
    if over.any():
        ax.plot(numbers[over], values[over], "o", ms=4, mfc="none", color="C0",
                label="complete, over the time budget")
    best = (np.fmin if lower_is_better else np.fmax).accumulate(
        np.where(done, values, np.inf if lower_is_better else -np.inf))
    shown = np.isfinite(best)
    ax.step(numbers[shown], best[shown], where="post", color="C3", label="best so far")
    for cause, colour, marker, label in (("loss", "C7", "v", "pruned: test loss"),
                                         ("time", "C1", "x", "pruned: over the time budget")):
        cut = [i for i, why in enumerate(pruned) if why == cause]
        if cut:
            ax.plot(cut, np.zeros(len(cut)), marker, color=colour, ms=7, clip_on=False,
                    transform=ax.get_xaxis_transform(), label=label)
    ax.set(xlabel="trial", ylabel=objective, xlim=(-0.5, max(len(values) - 0.5, 0.5)))
    ax.margins(y=0.12)  # the pruned trials' marks sit on the bottom axis, below every point
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    ax.set_title(f"{title}: {objective} by trial")
    if importances:
        names = list(importances)[::-1]  # the most important on top
        axes[1].barh(names, [importances[name] for name in names], color="C0")
        axes[1].set(xlabel="importance (share)", xlim=(0, 1), title="which parameters mattered")
        axes[1].grid(axis="x", alpha=0.3)
    return fig
