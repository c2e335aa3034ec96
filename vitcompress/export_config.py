"""The recipe's ``export:`` section (:class:`ExportConfig`), torch-free so that reading a recipe imports no exporter.

:func:`vitcompress.export.export_onnx` takes it; :mod:`vitcompress.recipe` validates it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ExportConfig(BaseModel):
    """How a model is exported: the recipe's ``export:`` section."""

    model_config = ConfigDict(extra="forbid")

    opset: int = Field(20, ge=17, le=23, description="ONNX opset; ≥ 20 exports GELU as one Gelu op, which "
                                                     "onnxruntime fuses with its bias")
    dynamic_batch: bool = True
    quantize: Literal["none", "dynamic", "static"] = Field(
        "none", description="int8 model.onnx by onnxruntime.quantization: static (QDQ, activation ranges from the "
                            "calibration images) or dynamic (activation ranges at run time); none: float32")
    calibration_method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="static only: how the calibration activations set the int8 ranges")
    per_channel: bool = Field(True, description="one int8 weight scale per output channel (else per tensor)")
    head_major: bool = Field(True, description="a timm Attention with a low-rank qkv is exported head-major "
                                               "(no per-block reshape/transpose; weight products absorbed where "
                                               "that saves MACs); false keeps timm's layout, e.g. for a runtime "
                                               "that fuses timm-form attention")
