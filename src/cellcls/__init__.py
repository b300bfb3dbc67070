"""cellcls: configurable PyTorch training for medical cell and X-ray image classification."""

__version__ = "0.1.0"
