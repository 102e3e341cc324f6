"""Matplotlib figures shared by the notebooks: mask overlays, galleries, coverage and depth plots,
learning curves, cut-off sweeps and scores per coverage class.

Every function draws a new figure (or into ``ax`` where it takes one) and returns the
``matplotlib.figure.Figure``; in a notebook with the inline backend the figure shows when the cell
ends. Images are ``(H, W)`` or ``(H, W, 1)`` gray levels in [0, 1]; masks are ``(H, W)`` bool.
Colours: the true salt is a translucent green fill, a predicted mask a red outline.
"""

from __future__ import annotations

import math

import numpy as np

TRUTH_RGBA = (0.1, 0.85, 0.2, 0.35)
PRED_COLOR = "red"


def _plt():
    import matplotlib.pyplot as plt

    return plt


def _gray(image) -> np.ndarray:
    image = np.asarray(image, np.float32)
    return image[..., 0] if image.ndim == 3 else image


def overlay(ax, image, mask=None, pred=None, title: str | None = None) -> None:
    """Draw one image with its true mask (green fill) and a predicted mask (red outline).

    Args:
        ax: a matplotlib Axes.
        image: ``(H, W)`` or ``(H, W, 1)`` gray levels in [0, 1].
        mask: ``(H, W)`` bool true salt, or None.
        pred: ``(H, W)`` bool predicted salt, or None.
        title: small title above the image.
    """
    ax.imshow(_gray(image), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    if mask is not None and np.any(mask):
        rgba = np.zeros(np.shape(mask) + (4,), np.float32)
        rgba[np.asarray(mask, bool)] = TRUTH_RGBA
        ax.imshow(rgba, interpolation="nearest")
    if pred is not None:
        pred = np.asarray(pred, bool)
        if pred.any() and not pred.all():
            ax.contour(pred.astype(np.float32), levels=[0.5], colors=PRED_COLOR, linewidths=1.0)
        elif pred.all():  # a full mask has no contour: frame the image instead
            h, w = pred.shape
            ax.plot([0, w - 1, w - 1, 0, 0], [0, 0, h - 1, h - 1, 0], color=PRED_COLOR, linewidth=2.0)
    if title:
        ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def gallery(images, masks=None, preds=None, titles=None, ncols: int = 6, size: float = 1.9,
            suptitle: str | None = None):
    """A grid of :func:`overlay` images.

    Args:
        images: ``(N, H, W)`` or ``(N, H, W, 1)``.
        masks: ``(N, H, W)`` true masks or None.
        preds: ``(N, H, W)`` predicted masks or None.
        titles: N strings or None.
        ncols: images per row.
        size: inches per image.
        suptitle: figure title.
    Returns:
        the Figure.
    """
    plt = _plt()
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + (0.4 if suptitle else 0)),
                             squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        if k >= n:
            ax.axis("off")
            continue
        overlay(
            ax, images[k],
            None if masks is None else masks[k],
            None if preds is None else preds[k],
            None if titles is None else titles[k],
        )
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def coverage_histogram(coverage, ax=None):
    """Histogram of the salt fraction per image, empty masks counted separately.

    Args:
        coverage: ``(N,)`` salt fractions in [0, 1].
    Returns:
        the Figure.
    """
    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.2))
    coverage = np.asarray(coverage)
    empty = coverage == 0
    ax.hist(coverage[~empty], bins=np.linspace(0, 1, 21), color="tab:blue", edgecolor="white",
            label=f"with salt ({(~empty).sum()})")
    ax.bar([-0.03], [empty.sum()], width=0.04, color="tab:gray", label=f"empty ({empty.sum()})")
    ax.set_xlabel("salt coverage (fraction of pixels)")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    ax.figure.tight_layout()
    return ax.figure


def depth_vs_coverage(depths, coverage, ax=None):
    """Scatter of depth z against salt coverage, with the mean coverage per depth bin.

    Args:
        depths: ``(N,)`` depth z.
        coverage: ``(N,)`` salt fractions.
    Returns:
        the Figure.
    """
    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.2))
    depths, coverage = np.asarray(depths, float), np.asarray(coverage, float)
    ax.scatter(depths, coverage, s=4, alpha=0.35, color="tab:blue", label="image")
    ok = np.isfinite(depths)
    if ok.sum() > 1 and np.ptp(depths[ok]) > 0:
        edges = np.linspace(depths[ok].min(), depths[ok].max(), 11)
        which = np.clip(np.digitize(depths[ok], edges) - 1, 0, 9)
        centers, means = [], []
        for b in range(10):
            sel = which == b
            if sel.any():
                centers.append(0.5 * (edges[b] + edges[b + 1]))
                means.append(coverage[ok][sel].mean())
        ax.plot(centers, means, "o-", color="tab:red", label="mean per depth bin")
    ax.set_xlabel("depth z")
    ax.set_ylabel("salt coverage")
    ax.legend(fontsize=8)
    ax.figure.tight_layout()
    return ax.figure


def intensity_histograms(images, masks):
    """Left: per-image mean and standard deviation of intensity; right: pixel intensity inside
    and outside salt.

    Args:
        images: ``(N, H, W[, 1])`` in [0, 1].
        masks: ``(N, H, W)`` bool.
    Returns:
        the Figure.
    """
    plt = _plt()
    images, masks = np.asarray(images, np.float32), np.asarray(masks, bool)
    images = images.reshape(len(images), int(np.prod(images.shape[1:])))  # also with no images (a limit's subset)
    masks = masks.reshape(len(masks), int(np.prod(masks.shape[1:])))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
    bins = np.linspace(0, 1, 41)
    a.hist(images.mean(axis=1), bins=bins, alpha=0.7, label="image mean")
    a.hist(images.std(axis=1), bins=bins, alpha=0.7, label="image std")
    a.set_xlabel("intensity")
    a.set_ylabel("images")
    a.legend(fontsize=8)
    for sel, label in ((masks, "salt pixels"), (~masks, "other pixels")):
        vals = images[sel]
        if len(vals):
            b.hist(vals, bins=bins, density=True, alpha=0.6, label=label)
    b.set_xlabel("pixel intensity")
    b.set_ylabel("density")
    if images.size:  # no pixels at all: nothing to label
        b.legend(fontsize=8)
    fig.tight_layout()
    return fig


def learning_curves(histories: dict):
    """Training loss, validation score and learning rate per epoch for each fold.

    Args:
        histories: fold -> DataFrame read from ``history.csv`` (columns ``stage``, ``epoch``,
            ``loss``, ``lr``, ``val_score``). Epochs are numbered through the stages; a dotted
            line marks where a new stage (loss) starts.
    Returns:
        the Figure.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for fold, h in sorted(histories.items()):
        h = h.sort_values(["stage", "epoch"]).reset_index(drop=True)
        x = np.arange(1, len(h) + 1)
        axes[0].plot(x, h["loss"], label=f"fold {fold}")
        if "val_score" in h and h["val_score"].notna().any():
            ok = h["val_score"].notna().to_numpy()
            axes[1].plot(x[ok], h["val_score"][ok], "o-", ms=3, label=f"fold {fold}")
        if "lr" in h:
            axes[2].plot(x, h["lr"], label=f"fold {fold}")
        for boundary in x[1:][np.diff(h["stage"].to_numpy()) != 0]:
            for ax in axes:
                ax.axvline(boundary - 0.5, color="gray", linestyle=":", linewidth=1)
    axes[0].set_title("training loss (per stage's loss)")
    axes[1].set_title("validation score (logit 0, no TTA)")
    axes[2].set_title("learning rate")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def threshold_curves(sweeps: dict, chosen: dict | None = None):
    """Score against the logit cut-off, one line per small-mask size, one panel per variant.

    Args:
        sweeps: label (e.g. ``"plain"``, ``"flip TTA"``) -> result of
            :func:`saltlib.metric.sweep_thresholds`.
        chosen: optional ``{"label", "threshold", "score"}`` marked with a star.
    Returns:
        the Figure.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5.5 * len(sweeps), 3.4), squeeze=False, sharey=True)
    for ax, (label, res) in zip(axes[0], sweeps.items()):
        for i, m in enumerate(res["min_sizes"]):
            ax.plot(res["thresholds"], res["table"][i], label=f"min size {int(m)}")
        ax.set_title(f"{label}: best {res['score']:.4f} at {res['threshold']:+.2f}, min size {res['min_size']}",
                     fontsize=9)
        ax.set_xlabel("cut-off (logit)")
        if chosen and chosen.get("label") == label:
            ax.plot([chosen["threshold"]], [chosen["score"]], "*", color="black", ms=12, label="chosen")
    axes[0][0].set_ylabel("competition score")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def score_by_class(table):
    """Bar chart of the mean score per coverage class, with the image count on each bar.

    Args:
        table: DataFrame indexed by coverage class with columns ``n`` and ``score``.
    Returns:
        the Figure.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = np.asarray(table.index)
    bars = ax.bar(x, table["score"], color="tab:blue")
    for bar, n in zip(bars, table["n"]):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01, str(int(n)),
                ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels(["empty" if c == 0 else f"{10 * (c - 1)}-{10 * c}%" for c in x], fontsize=7)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("salt coverage class (numbers: images)")
    ax.set_ylabel("mean score")
    fig.tight_layout()
    return fig


def coverage_comparison(coverages: dict):
    """Overlaid coverage histograms (e.g. predicted test coverage next to the training truth).

    Args:
        coverages: label -> ``(N,)`` salt fractions.
    Returns:
        the Figure.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bins = np.concatenate([[-0.05, 1e-9], np.linspace(0.05, 1, 20)])
    for label, cov in coverages.items():
        cov = np.asarray(cov, float)
        ax.hist(cov, bins=bins, density=False, weights=np.full(len(cov), 1 / max(len(cov), 1)),
                alpha=0.55, label=f"{label} ({len(cov)})")
    ax.set_xlabel("salt coverage (first bar: empty)")
    ax.set_ylabel("share of images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
