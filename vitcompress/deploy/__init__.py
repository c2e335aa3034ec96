"""Deployment without torch: onnxruntime sessions, the self-checking bundle, prediction, Triton, offline optimisation
and the machine-wide latency lock. Nothing under this package imports torch, timm or the ONNX exporter."""
