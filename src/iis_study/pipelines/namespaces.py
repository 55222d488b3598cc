"""One namespaced copy of a pipeline template per backbone (as Kedro-Viz's demo project does)."""

from __future__ import annotations

from collections.abc import Iterable

from kedro.pipeline import Pipeline


def per_backbone(
    template: Pipeline, backbones: Iterable[str], inputs: Iterable[str] = (), shared_params: Iterable[str] = ()
) -> Pipeline:
    """``template`` copied into namespace ``<name>`` for every backbone.

    ``params:backbone`` (when the template uses it) becomes ``params:backbones.<name>``;
    ``shared_params`` (e.g. ``"sweep"``) and the dataset-level ``inputs`` (e.g. ``"splits"``)
    stay global, every other dataset is prefixed with the namespace.
    """
    used = template.all_inputs()
    pipes = []
    for name in backbones:
        parameters = {f"params:{p}": f"params:{p}" for p in shared_params}
        if "params:backbone" in used:
            parameters["params:backbone"] = f"params:backbones.{name}"
        pipes.append(Pipeline(template, namespace=name, inputs=set(inputs) or None, parameters=parameters))
    return sum(pipes, Pipeline([]))
