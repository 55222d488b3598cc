"""The study's figures (METHOD §4, §6, §7).

* :func:`iis_vs_accuracy` -- IIS (or chance-corrected IIS) against linear-probe accuracy,
  one panel per concept type, with error bars, the random-init controls, a least-squares
  line and the correlation coefficients.
* :func:`sparsity_curves` -- ARR(s) (or A(s)) against the sparsity ratio, one line per
  backbone (mean over seeds, ±std band), one panel per concept type.
* :func:`concept_gallery` -- test images next to the concept images that drove their
  predictions.
* :func:`iis_with_nulls` -- each representation's IIS beside the IIS of its null concept sets.
* :func:`specification_curve` -- Pearson r under every specification of the analysis, sorted, with the
  verdict on its sign.
* :func:`fine_tuning_curves` -- test accuracy and IIS over fine-tuning epochs for each λ
  (λ = 0 is the cross-entropy-only control).

Every function returns a :class:`matplotlib.figure.Figure` and neither saves nor shows
it. Figures are built with the object-oriented API on an Agg canvas (no ``pyplot``, so no
global figure registry and no global ``rcParams`` change); all sizes are in inches and
points, so they do not depend on the dpi a figure is saved at.

Modules: :mod:`.correlation` (IIS vs accuracy), :mod:`.curves` (sparsity curves),
:mod:`.gallery` (the concept gallery), :mod:`.fine_tuning` (fine-tuning curves) and :mod:`.style`
(layout, fonts, palette, formats and input checks they share).
"""

from __future__ import annotations

from .correlation import PERFECT_IIS, iis_vs_accuracy, iis_vs_accuracy_by_scope
from .curves import sparsity_curves
from .fine_tuning import fine_tuning_curves
from .gallery import concept_gallery
from .nulls import iis_with_nulls
from .specification import specification_curve

__all__ = [
    "PERFECT_IIS",
    "concept_gallery",
    "fine_tuning_curves",
    "iis_vs_accuracy",
    "iis_vs_accuracy_by_scope",
    "iis_with_nulls",
    "sparsity_curves",
    "specification_curve",
]
