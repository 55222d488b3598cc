"""The concept gallery: test images next to the concept images that drove their predictions
(:func:`concept_gallery`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .style import FONT, SMALL, new_figure, require_columns

_CORRECT, _WRONG = "#1a9641", "#d7191c"
_DIM = 0.25  # brightness kept outside a concept's mask


def concept_gallery(
    images: np.ndarray,
    labels: Sequence[int],
    class_names: Sequence[str],
    explanation: pd.DataFrame,
    element_images: np.ndarray,
    concept_elements: Sequence[int],
    title: str = "",
    masks: np.ndarray | None = None,
    concept_names: Sequence[str] | None = None,
) -> Figure:
    """Test images beside the concepts that drove their predictions.

    One row per test image ``i`` (``explanation.sample == i`` indexes ``images`` and
    ``labels``): the image, titled with its true and predicted class and ✓/✗ (framed green
    or red), then its concepts in rank order (smallest rank = largest contribution). Each
    concept ``c`` is shown as its source element image
    ``element_images[concept_elements[c]]``, titled "concept c: +0.53" with the
    contribution ``a_c · W[pred, c]`` to the predicted class' logit. With ``masks`` (the
    elements' bool masks, ``(E, S, S)``) the area outside the mask is dimmed. A negative
    ``concept_elements[c]`` means "no element image" (e.g. a textual concept): a blank
    tile showing the concept's name.

    Args:
        images: ``(N, H, W, 3)`` uint8 test images.
        labels: the N true class indices.
        class_names: class index -> name.
        explanation: columns sample, predicted, rank, concept, contribution (as returned
            by :func:`iis_study.core.heads.explain`).
        element_images: ``(E, S, S, 3)`` uint8 element images.
        concept_elements: concept index -> element index (``-1``: none).
        title: figure title.
        masks: optional ``(E, S, S)`` element masks.
        concept_names: optional concept index -> name, added to the tile titles.

    Returns:
        The figure: ``N × (1 + T)`` axes, ``T`` the most concepts listed for one image.
    """
    images = _check_images(images, "images", square=False)
    element_images = _check_images(element_images, "element_images", square=True)
    n = len(images)
    labels = _check_labels(labels, n, len(class_names))
    require_columns(explanation, ["sample", "predicted", "rank", "concept", "contribution"], "explanation")
    concept_elements = np.asarray(concept_elements, dtype=np.int64)
    _check_explanation(explanation, n, len(class_names), concept_elements, len(element_images))
    if masks is not None:
        masks = np.asarray(masks, dtype=bool)
        if masks.shape != element_images.shape[:3]:
            raise ValueError(f"masks must have shape {element_images.shape[:3]} (E, S, S), got {masks.shape}")
    if concept_names is not None and len(concept_names) < len(concept_elements):
        raise ValueError(
            f"concept_names must name every concept ({len(concept_elements)}), got {len(concept_names)} names"
        )
    per_sample = {int(s): g.sort_values("rank") for s, g in explanation.groupby("sample")}
    n_concepts = max([len(g) for g in per_sample.values()] + [1])
    cell_w, cell_h = 1.55, 1.95
    head = 0.45 if title else 0.25
    fig = new_figure(cell_w * (1 + n_concepts) + 0.2, cell_h * n + head)
    grid = fig.add_gridspec(n, 1 + n_concepts, wspace=0.02, hspace=0.02)
    for i in range(n):
        rows = per_sample.get(i)
        predicted = int(rows["predicted"].iloc[0]) if rows is not None and len(rows) else None
        _image_tile(fig.add_subplot(grid[i, 0]), images[i], class_names, int(labels[i]), predicted)
        for j in range(n_concepts):
            ax = fig.add_subplot(grid[i, 1 + j])
            if rows is not None and j < len(rows):
                row = rows.iloc[j]
                c = int(row["concept"])
                name = None if concept_names is None else str(concept_names[c])
                element = int(concept_elements[c])
                _concept_tile(ax, element_images, masks, element, c, float(row["contribution"]), name)
            else:
                _blank_tile(ax, "no kept concept" if j == 0 else "")
    subtitle = (
        "each row: a test image, then the concepts kept for it, ranked by their contribution\n"
        "(activation × head weight) to the predicted class' logit"
    )
    fig.suptitle(f"{title}\n{subtitle}" if title else subtitle, fontsize=FONT if title else SMALL)
    return fig


def _check_images(arr: np.ndarray, name: str, square: bool) -> np.ndarray:
    """``arr`` as an ``(N, H, W, 3)`` uint8 array (``H == W`` if ``square``)."""
    arr = np.asarray(arr)
    if arr.ndim != 4 or arr.shape[-1] != 3 or (square and arr.shape[1] != arr.shape[2]):
        shape = "(E, S, S, 3)" if square else "(N, H, W, 3)"
        raise ValueError(f"{name} must be a {shape} RGB array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"{name} must have dtype uint8, got {arr.dtype}")
    if len(arr) == 0 and not square:
        raise ValueError(f"{name} must hold at least one image")
    return arr


def _check_labels(labels: Sequence[int], n: int, n_classes: int) -> np.ndarray:
    """The labels as an int array of length ``n`` within ``[0, n_classes)``."""
    arr = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(arr) != n:
        raise ValueError(f"labels must have one entry per image ({n}), got {len(arr)}")
    if n_classes == 0 or arr.min() < 0 or arr.max() >= n_classes:
        raise ValueError(
            f"labels must lie in [0, {n_classes}) (the class_names), got range [{arr.min()}, {arr.max()}]"
        )
    return arr


def _check_explanation(
    explanation: pd.DataFrame, n: int, n_classes: int, concept_elements: np.ndarray, n_elements: int
) -> None:
    """Samples index the images, classes the class names, concepts ``concept_elements``."""
    if concept_elements.ndim != 1:
        raise ValueError(
            f"concept_elements must be 1-D (concept -> element index), got shape {concept_elements.shape}"
        )
    checks = (
        ("sample", n, "images"),
        ("predicted", n_classes, "class_names"),
        ("concept", len(concept_elements), "concept_elements"),
    )
    for column, bound, against in checks:
        col = explanation[column].to_numpy()
        if (col < 0).any() or (col >= bound).any():
            raise ValueError(
                f"explanation.{column} must index {against} (range [0, {bound})), "
                f"got {sorted(set(col.tolist()))}"
            )
    if (concept_elements >= n_elements).any():
        raise ValueError(
            f"concept_elements must index element_images (< {n_elements}), got max {concept_elements.max()}"
        )
    if explanation.groupby("sample")["predicted"].nunique().gt(1).any():
        raise ValueError("explanation must give one predicted class per sample")


def _image_tile(
    ax: Axes, image: np.ndarray, class_names: Sequence[str], label: int, predicted: int | None
) -> None:
    """The test image titled with the true and predicted class, framed green (✓) or red (✗)."""
    ax.imshow(image, interpolation="nearest")
    _clear_ticks(ax)
    if predicted is None:
        ax.set_title(f"true: {class_names[label]}\npred: ?", fontsize=SMALL)
        return
    ok = predicted == label
    color = _CORRECT if ok else _WRONG
    ax.set_title(
        f"true: {class_names[label]}\npred: {class_names[predicted]} {'✓' if ok else '✗'}",
        fontsize=SMALL,
        color=color,
        fontweight="bold",
    )
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(color)
        spine.set_linewidth(3)


def _concept_tile(
    ax: Axes,
    element_images: np.ndarray,
    masks: np.ndarray | None,
    element: int,
    concept: int,
    contribution: float,
    name: str | None,
) -> None:
    """The concept's element image (dimmed outside its mask), titled with its contribution."""
    head = f"concept {concept}" + (f" ({name}):\n" if name else ": ")
    if element < 0:
        _blank_tile(ax, name or "(no image)")
    else:
        img = element_images[element]
        if masks is not None:
            img = _dim_outside(img, masks[element])
        ax.imshow(img, interpolation="nearest")
        _clear_ticks(ax)
    color = "#222222" if contribution >= 0 else _WRONG
    ax.set_title(f"{head}{contribution:+.2f}", fontsize=SMALL, color=color)


def _dim_outside(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``img`` with the pixels outside ``mask`` darkened to ``_DIM`` brightness."""
    factor = np.where(mask[..., None], 1.0, _DIM)
    return (img.astype(np.float32) * factor).round().astype(np.uint8)


def _blank_tile(ax: Axes, text: str) -> None:
    """An empty tile, optionally with a centred note."""
    ax.axis("off")
    if text:
        ax.text(
            0.5, 0.5, text, ha="center", va="center", fontsize=SMALL, color="#666666", transform=ax.transAxes
        )


def _clear_ticks(ax: Axes) -> None:
    """No ticks or tick labels, keep the frame."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor("#bbbbbb")
        spine.set_linewidth(0.6)
