"""vitcompress: turn a pretrained Vision Transformer into a faster one that gives the same answers.

Public API (imported lazily so that the CLI's ``--help`` does not pay for torch)::

    import vitcompress

    vitcompress.apply(model, vitcompress.TaylorConfig())            # transform in place, returns the model
    result = vitcompress.convert("vit_fmnist", "recipes/fast.yaml")  # the whole pipeline → ConvertResult
    result.report.validation.models["converted"].latency[1].p50_ms

Also: ``load_recipe``, ``Report``, ``ConvertResult``, ``plan``, ``sensitivity`` (→ ``Sensitivity``), ``tune``
(→ ``TuneResult``; its space: ``SearchSpace``),
``export_onnx``, ``load_model`` and the transform configs ``LowRankConfig``, ``TaylorConfig``,
``BinaryAttentionConfig``, ``ShiftConfig``, ``MoEConfig``, ``SkipConfig``, ``TokenMergeConfig``.
"""

from __future__ import annotations

from importlib import import_module

_PUBLIC = {
    "apply": "vitcompress.api",
    "apply_recipe": "vitcompress.api",
    "convert": "vitcompress.api",
    "ConvertResult": "vitcompress.api",
    "Report": "vitcompress.report",
    "plan": "vitcompress.planner",
    "sensitivity": "vitcompress.sensitivity_map",
    "Sensitivity": "vitcompress.sensitivity_map",
    "tune": "vitcompress.search.run",
    "TuneResult": "vitcompress.search.result",
    "SearchSpace": "vitcompress.search.space",
    "load_recipe": "vitcompress.recipe",
    "Recipe": "vitcompress.recipe",
    "export_onnx": "vitcompress.export",
    "load_model": "vitcompress.models",
    "to_deploy": "vitcompress.export",
    "LowRankConfig": "vitcompress.transforms.lowrank",
    "TaylorConfig": "vitcompress.transforms.taylor",
    "BinaryAttentionConfig": "vitcompress.transforms.shiftadd_attention",
    "ShiftConfig": "vitcompress.transforms.shift_linear",
    "MoEConfig": "vitcompress.transforms.shiftadd_moe",
    "SkipConfig": "vitcompress.transforms.skip",
    "TokenMergeConfig": "vitcompress.transforms.token_merge",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'vitcompress' has no attribute {name!r}")
