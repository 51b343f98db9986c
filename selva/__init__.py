"""SELVA model library: pure PyTorch (no Ray, DeepSpeed or MLflow imports)."""

__version__ = "0.1.0"
