"""SAIR: autoscaler for multi-stage ML inference pipelines."""

__version__ = "0.1.0"
