"""Tests for the study's figures (iis_study.core.reporting.plots)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from iis_study.core.reporting.plots import (  # noqa: E402
    concept_gallery,
    fine_tuning_curves,
    iis_vs_accuracy,
    iis_vs_accuracy_by_scope,
    sparsity_curves,
)

GRID = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def save_png(fig: Figure, path: Path) -> None:
    """Save and check that a non-trivial PNG was written."""
    fig.savefig(path)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000


def texts(fig: Figure) -> list[str]:
    """Every text string drawn in the figure (titles, labels, annotations, legend)."""
    return [t.get_text() for t in fig.findobj(matplotlib.text.Text)]


# --------------------------------------------------------------------------- fixtures


def scores_table(backbones: list[tuple[str, str]], types: list[str]) -> pd.DataFrame:
    rows = []
    for t in types:
        for i, (name, weights) in enumerate(backbones):
            acc = 0.2 if weights == "random" else 0.6 + 0.1 * i
            iis = 0.9 if weights == "random" else 0.5 + 0.1 * i
            rows.append(
                dict(backbone=name, concept_type=t, model=name, weights=weights, accuracy_linear_probe=acc,
                     accuracy_linear_probe_std=0.01, iis=iis, iis_std=0.02, iis_ci_low=iis - 0.03,
                     iis_ci_high=iis + 0.02, iis_chance_corrected=iis - 0.3, n_seeds=3)
            )
    return pd.DataFrame(rows)


def stats(r, p, low=None, high=None) -> dict:
    return {"r": r, "p": p, "ci_low": low, "ci_high": high}


@pytest.fixture
def scores() -> pd.DataFrame:
    return scores_table([("resnet18", "offline"), ("resnet50", "hub"), ("vit_b16", "offline"),
                         ("resnet50_rand", "random")], ["prototype", "cluster"])


@pytest.fixture
def correlation() -> dict:
    return {
        "prototype": {
            "iis": {"pearson": stats(0.81, 0.012, 0.3, 0.97), "spearman": stats(0.7, 0.2),
                    "kendall": stats(None, None), "n_backbones": 4},
            "iis_chance_corrected": {"pearson": stats(0.5, 0.4), "spearman": stats(0.4, 0.5),
                                     "kendall": stats(0.33, 0.7), "n_backbones": 4},
        },
        "cluster": {
            "iis": {
                "pearson": stats(float("nan"), float("nan")),
                "spearman": None,
                "kendall": stats(0.1, 0.9),
                "n_backbones": 4,
            }
        },
    }


def curves_table(backbones: list[str], types: list[str], seeds: list[int]) -> pd.DataFrame:
    rows = []
    for t in types:
        for b, backbone in enumerate(backbones):
            for seed in seeds:
                for s in GRID:
                    acc = 0.8 * (1 - s ** (2 + b)) + 0.01 * seed
                    rows.append(dict(backbone=backbone, concept_type=t, seed=seed, sparsity=s, accuracy=acc,
                                     arr=acc / 0.8, arr_chance_corrected=(acc - 0.1) / 0.7))
    return pd.DataFrame(rows)


def gallery_inputs(n: int = 3, top: int = 2):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 16, 20, 3), dtype=np.uint8)
    element_images = np.full((6, 8, 8, 3), 200, dtype=np.uint8)
    rows = []
    for i in range(n):
        for r in range(top):
            rows.append(dict(sample=i, predicted=i % 2, rank=r + 1, concept=(i + r) % 4, activation=1.0,
                             contribution=0.53 - 0.2 * r))
    return images, [0, 1, 1][:n], ["cat", "dog"], pd.DataFrame(rows), element_images, [5, 4, 3, 2]


def fine_tuning_table(
    backbones: list[str], seeds: list[int], lams: tuple[float, ...] = (0.0, 1.0), epochs: int = 4
) -> pd.DataFrame:
    rows = []
    for backbone in backbones:
        for lam in lams:
            for seed in seeds:
                for epoch in range(epochs):
                    rows.append(dict(backbone=backbone, lam=lam, seed=seed, epoch=epoch,
                                     accuracy_test=0.5 + 0.1 * epoch + 0.01 * seed + 0.05 * lam,
                                     accuracy_linear_probe=0.5,
                                     iis=0.6 + 0.01 * seed if epoch % 2 == 0 else np.nan))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- iis_vs_accuracy


def test_iis_vs_accuracy_panels_titles_and_png(scores, correlation, tmp_path) -> None:
    n_before = len(plt.get_fignums())
    fig = iis_vs_accuracy(scores, correlation)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert len(plt.get_fignums()) == n_before, "must not register figures with pyplot"
    proto, cluster = (ax.get_title(loc="left") for ax in fig.axes)
    assert "prototype" in proto and "Pearson r = 0.81 [0.30, 0.97], p = 0.012" in proto
    assert "Spearman ρ = 0.70" in proto and "Kendall τ = n/a, p = n/a" in proto
    assert "Pearson r = n/a" in cluster and "Spearman ρ = n/a" in cluster and "Kendall τ = 0.10" in cluster
    all_text = texts(fig)
    for name in ["resnet18", "resnet50", "vit_b16", "resnet50_rand"]:
        assert all_text.count(name) == 2  # one label per panel
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("random" in t for t in legend) and any("least-squares" in t for t in legend)
    save_png(fig, tmp_path / "iis.png")


def test_iis_vs_accuracy_fit_line_and_error_bars(scores, correlation) -> None:
    fig = iis_vs_accuracy(scores, correlation)
    ax = fig.axes[0]
    fits = [line for line in ax.get_lines() if line.get_label() == "_fit"]
    assert len(fits) == 1
    group = scores[scores.concept_type == "prototype"]
    slope, intercept = np.polyfit(group.accuracy_linear_probe, group.iis, 1)
    xs, ys = fits[0].get_data()
    np.testing.assert_allclose(ys, slope * np.asarray(xs) + intercept)
    # the random-init control is drawn separately (an "X" marker)
    markers = {line.get_marker() for line in ax.get_lines()}
    assert {"o", "X"} <= markers
    # vertical error bars span the bootstrap interval [ci_low, ci_high]
    segments = [seg for coll in ax.collections for seg in coll.get_segments()]
    vertical = [seg for seg in segments if np.isclose(seg[0][0], seg[1][0])]
    spans = sorted(round(abs(seg[1][1] - seg[0][1]), 6) for seg in vertical)
    assert spans == pytest.approx([0.05] * len(group))


def test_iis_vs_accuracy_chance_corrected_and_missing_correlation(scores, tmp_path) -> None:
    fig = iis_vs_accuracy(scores, {}, score="iis_chance_corrected")
    assert len(fig.axes) == 2
    assert fig.axes[0].get_ylabel() == "chance-corrected IIS"
    assert "Pearson r = n/a, p = n/a" in fig.axes[0].get_title(loc="left")
    save_png(fig, tmp_path / "iis_cc.png")


def test_iis_vs_accuracy_single_backbone_has_no_fit(tmp_path) -> None:
    one = scores_table([("resnet18", "offline")], ["prototype"])
    fig = iis_vs_accuracy(one, {"prototype": {"iis": None}})
    assert len(fig.axes) == 1
    assert not [line for line in fig.axes[0].get_lines() if line.get_label() == "_fit"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert not any("random" in t for t in legend)
    save_png(fig, tmp_path / "one.png")


def test_iis_vs_accuracy_nan_scores_do_not_break(scores, correlation, tmp_path) -> None:
    scores = scores.copy()
    scores.loc[0, ["iis", "iis_ci_low", "iis_ci_high", "accuracy_linear_probe_std"]] = np.nan
    fig = iis_vs_accuracy(scores, correlation)
    save_png(fig, tmp_path / "nan.png")
    assert texts(fig).count("resnet18") == 1  # the NaN point gets no label


def test_iis_vs_accuracy_rejects_bad_inputs(scores, correlation) -> None:
    with pytest.raises(ValueError, match="score"):
        iis_vs_accuracy(scores, correlation, score="nope")
    with pytest.raises(ValueError, match="missing columns"):
        iis_vs_accuracy(scores.drop(columns="weights"), correlation)
    with pytest.raises(ValueError, match="correlation"):
        iis_vs_accuracy(scores, [1, 2])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- sparsity_curves


def test_sparsity_curves_layout_means_and_png(tmp_path) -> None:
    curves = curves_table(["a", "b"], ["prototype", "cluster", "textual"], seeds=[0, 1, 2])
    fig = sparsity_curves(curves)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    for ax in fig.axes:
        assert ax.get_ylim()[0] == 0.0
        np.testing.assert_allclose(ax.get_xticks(), GRID)
        lines = [line for line in ax.get_lines() if line.get_label() in ("a", "b")]
        assert len(lines) == 2
        dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert len(dashed) == 1 and np.allclose(dashed[0].get_ydata(), 1.0)
        assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 2  # ±std bands
    a_line = next(line for line in fig.axes[0].get_lines() if line.get_label() == "a")
    sel = (curves.backbone == "a") & (curves.concept_type == "prototype")
    expected = curves[sel].groupby("sparsity").arr.mean()
    np.testing.assert_allclose(a_line.get_ydata(), expected.to_numpy())
    save_png(fig, tmp_path / "curves.png")


def test_sparsity_curves_single_seed_single_backbone_accuracy(tmp_path) -> None:
    curves = curves_table(["a"], ["prototype"], seeds=[0])
    fig = sparsity_curves(curves, value="accuracy")
    ax = fig.axes[0]
    assert len(fig.axes) == 1 and ax.get_ylim()[0] == 0.0
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]  # no band from one seed
    assert not [line for line in ax.get_lines() if line.get_linestyle() == "--"]  # y = 1 only for ARR
    save_png(fig, tmp_path / "one.png")


def test_sparsity_curves_negative_chance_corrected_extends_axis() -> None:
    curves = curves_table(["a"], ["prototype"], seeds=[0, 1])
    curves["arr_chance_corrected"] -= 0.5
    fig = sparsity_curves(curves, value="arr_chance_corrected")
    assert fig.axes[0].get_ylim()[0] < 0


def test_sparsity_curves_rejects_bad_inputs() -> None:
    curves = curves_table(["a"], ["prototype"], seeds=[0])
    with pytest.raises(ValueError, match="value"):
        sparsity_curves(curves, value="iis")
    with pytest.raises(ValueError, match="seed"):
        sparsity_curves(curves.drop(columns="seed"))
    with pytest.raises(ValueError, match="at least one row"):
        sparsity_curves(curves.iloc[:0])


# --------------------------------------------------------------------------- concept_gallery


def test_concept_gallery_grid_titles_and_png(tmp_path) -> None:
    images, labels, classes, expl, elements, concept_elements = gallery_inputs(n=3, top=2)
    fig = concept_gallery(
        images, labels, classes, expl, elements, concept_elements, title="resnet50 / s = 0.9"
    )
    assert isinstance(fig, Figure) and len(fig.axes) == 3 * 3
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "true: cat\npred: cat ✓"
    assert titles[3] == "true: dog\npred: dog ✓"
    assert titles[6] == "true: dog\npred: cat ✗"
    assert titles[1] == "concept 0: +0.53" and titles[2] == "concept 1: +0.33"
    # the concept tile shows its source element image
    shown = fig.axes[1].get_images()[0].get_array()
    np.testing.assert_array_equal(shown, elements[concept_elements[0]])
    assert "resnet50 / s = 0.9" in fig.get_suptitle()
    save_png(fig, tmp_path / "gallery.png")


def test_concept_gallery_orders_by_rank_and_pads_short_rows() -> None:
    images, labels, classes, expl, elements, concept_elements = gallery_inputs(n=2, top=3)
    expl = expl.iloc[::-1].reset_index(drop=True)  # rank order must not depend on row order
    expl = expl[~((expl["sample"] == 1) & (expl["rank"] > 1))]  # sample 1 keeps one concept
    fig = concept_gallery(images, labels[:2], classes, expl, elements, concept_elements)
    assert len(fig.axes) == 2 * 4
    assert fig.axes[1].get_title().startswith("concept 0:")
    assert fig.axes[3].get_title().startswith("concept 2:")
    assert not fig.axes[6].axison and not fig.axes[7].axison  # empty tiles


def test_concept_gallery_dims_outside_mask_and_names(tmp_path) -> None:
    images, labels, classes, expl, elements, concept_elements = gallery_inputs(n=1, top=1)
    masks = np.zeros(elements.shape[:3], dtype=bool)
    masks[:, 2:6, 2:6] = True
    names = ["wing", "wheel", "beak", "fur"]
    fig = concept_gallery(images, labels[:1], classes, expl, elements, concept_elements, masks=masks,
                          concept_names=names)
    shown = np.asarray(fig.axes[1].get_images()[0].get_array())
    assert (shown[2:6, 2:6] == 200).all()
    assert (shown[0, 0] == 50).all()  # 200 * 0.25 outside the mask
    assert fig.axes[1].get_title() == "concept 0 (wing):\n+0.53"
    save_png(fig, tmp_path / "masked.png")


def test_concept_gallery_sample_without_concepts_and_no_element_image() -> None:
    images, labels, classes, expl, elements, concept_elements = gallery_inputs(n=2, top=1)
    expl = expl[expl["sample"] == 0]
    fig = concept_gallery(images, labels[:2], classes, expl, elements, [-1, 4, 3, 2])
    assert len(fig.axes) == 2 * 2
    assert not fig.axes[1].get_images() and fig.axes[1].get_title() == "concept 0: +0.53"
    assert "no kept concept" in [t.get_text() for t in fig.axes[3].texts]
    assert fig.axes[2].get_title() == "true: dog\npred: ?"


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: {**a, "images": a["images"][..., :2]}, "images"),
        (lambda a: {**a, "images": a["images"].astype(np.float32)}, "uint8"),
        (lambda a: {**a, "labels": [0, 1]}, "labels"),
        (lambda a: {**a, "labels": [0, 1, 5]}, "labels"),
        (lambda a: {**a, "element_images": a["element_images"][:, :, :4]}, "element_images"),
        (lambda a: {**a, "concept_elements": [0, 1]}, "explanation.concept"),
        (lambda a: {**a, "concept_elements": [9, 1, 2, 3]}, "concept_elements"),
        (lambda a: {**a, "explanation": a["explanation"].assign(sample=7)}, "explanation.sample"),
        (lambda a: {**a, "explanation": a["explanation"].assign(predicted=2)}, "explanation.predicted"),
        (lambda a: {**a, "explanation": a["explanation"].drop(columns="rank")}, "rank"),
        (lambda a: {**a, "masks": np.ones((6, 4, 4), dtype=bool)}, "masks"),
        (lambda a: {**a, "concept_names": ["x"]}, "concept_names"),
    ],
)
def test_concept_gallery_rejects_bad_inputs(change, match) -> None:
    images, labels, classes, expl, elements, concept_elements = gallery_inputs(n=3, top=2)
    args = dict(images=images, labels=labels, class_names=classes, explanation=expl, element_images=elements,
                concept_elements=concept_elements)
    with pytest.raises(ValueError, match=match):
        concept_gallery(**change(args))


# --------------------------------------------------------------------------- fine_tuning_curves


def test_fine_tuning_curves_two_backbones(tmp_path) -> None:
    df = fine_tuning_table(["resnet18", "vit_b16"], seeds=[0, 1, 2])
    fig = fine_tuning_curves(df)
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    assert [ax.get_title() for ax in fig.axes] == [
        "resnet18: test accuracy", "resnet18: IIS", "vit_b16: test accuracy", "vit_b16: IIS"]
    acc_ax, iis_ax = fig.axes[:2]
    labels = [line.get_label() for line in acc_ax.get_lines()]
    assert labels == ["λ = 0 (control)", "λ = 1"]
    control = acc_ax.get_lines()[0]
    expected = df[(df.backbone == "resnet18") & (df.lam == 0)].groupby("epoch").accuracy_test.mean()
    np.testing.assert_allclose(control.get_ydata(), expected.to_numpy())
    # IIS is only plotted at the scored epochs (NaN elsewhere)
    np.testing.assert_array_equal(iis_ax.get_lines()[0].get_xdata(), [0, 2])
    bands = [c for c in acc_ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2  # min–max bands
    control_rows = df[(df.backbone == "resnet18") & (df.lam == 0)].groupby("epoch").accuracy_test
    edge = bands[0].get_paths()[0].vertices[:, 1]  # the band's outline: the seeds' minima and maxima
    np.testing.assert_allclose(sorted(set(np.round(edge, 12))),
                               sorted(set(np.round(np.r_[control_rows.min(), control_rows.max()], 12))))
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "min–max over seeds" in legend
    save_png(fig, tmp_path / "ft.png")


def test_fine_tuning_curves_single_seed_single_backbone_unscored_iis(tmp_path) -> None:
    df = fine_tuning_table(["resnet18"], seeds=[0], lams=(0.0, 0.5))
    df["iis"] = np.nan
    fig = fine_tuning_curves(df)
    assert len(fig.axes) == 2
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["λ = 0 (control)", "λ = 0.5"]
    assert not fig.axes[1].get_lines() and "not scored" in [t.get_text() for t in fig.axes[1].texts]
    assert "1 seed)" in fig.axes[0].get_ylabel()
    save_png(fig, tmp_path / "ft1.png")


def test_fine_tuning_curves_rejects_missing_columns() -> None:
    with pytest.raises(ValueError, match="lam"):
        fine_tuning_curves(fine_tuning_table(["a"], [0]).drop(columns="lam"))


def test_figures_leave_rcparams_alone(scores, correlation) -> None:
    """Library functions leave global matplotlib state alone."""
    before = dict(matplotlib.rcParams)
    iis_vs_accuracy(scores, correlation)
    sparsity_curves(curves_table(["a"], ["prototype"], seeds=[0]))
    assert dict(matplotlib.rcParams) == before


def test_iis_vs_accuracy_at_study_scale_uses_a_legend_and_fits_the_pretrained_scope() -> None:
    """24 representations from families: colour by family, marker by layer, size by resolution in a
    legend, no per-point labels (they would pile up), and the fit over the pretrained points only."""
    rows = []
    rng = np.random.default_rng(0)
    for fam, weights in (("lite0", "offline"), ("lite1", "offline"), ("lite2", "offline"), ("lite0_random", "random")):
        for layer in ("stage3", "stage4", "penultimate"):
            for size in (32, 96):
                acc = rng.uniform(0.2, 0.3) if weights == "random" else rng.uniform(0.4, 0.7)
                rows.append({"backbone": f"{fam}@{size}/{layer}", "concept_type": "prototype", "weights": weights,
                             "family": fam, "layer": layer, "input_size": size, "accuracy_linear_probe": acc,
                             "iis": 0.5 + 0.5 * acc if weights != "random" else 0.99})
    scores = pd.DataFrame(rows)
    fig = iis_vs_accuracy(scores, {"prototype": {"iis": {"scope": "pretrained", "n_backbones": 18}}})
    ax = fig.axes[0]
    legend = ax.get_legend()
    texts = {t.get_text() for t in legend.get_texts()}
    assert {"lite0", "lite1", "lite2", "lite0_random", "stage3", "penultimate", "32 px", "96 px"} <= texts
    assert not [t for t in ax.texts if t.get_text().startswith("lite")]  # no per-point labels at 24 points
    fits = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(fits) == 1
    xs, ys = fits[0].get_data()
    slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
    assert slope == pytest.approx(0.5, abs=1e-9)  # the random controls (IIS 0.99) are not in the fit
    assert "representations" in fig._suptitle.get_text()


def test_iis_vs_accuracy_by_scope_one_figure_per_scope_with_its_members() -> None:
    scores = pd.DataFrame({
        "backbone": ["a", "b", "c", "r"] * 1, "concept_type": ["prototype"] * 4,
        "weights": ["offline", "offline", "offline", "random"], "accuracy_linear_probe": [0.5, 0.6, 0.7, 0.2],
        "iis": [0.8, 0.85, 0.9, 0.95],
    })
    scopes = {"groups": [
        {"scope": "all", "group": "all", "representations": ["a", "b", "c", "r"], "correlation": {}},
        {"scope": "pretrained", "group": "pretrained", "representations": ["a", "b", "c"], "correlation": {}},
        {"scope": "family", "group": "lite0", "representations": ["a", "b"], "correlation": {}},
    ]}
    figs = iis_vs_accuracy_by_scope(scores, scopes)
    assert list(figs) == ["all", "pretrained", "family_lite0"]
    labels = {name: {t.get_text().rstrip(" †") for t in fig.axes[0].texts} for name, fig in figs.items()}
    assert labels == {"all": {"a", "b", "c", "r"}, "pretrained": {"a", "b", "c"}, "family_lite0": {"a", "b"}}
    assert "family lite0 scope (2 representations)" in figs["family_lite0"]._suptitle.get_text()
