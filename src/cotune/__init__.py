"""cotune: fine-tune foundation models across weak devices and a cloud."""

__version__ = "0.1.0"
