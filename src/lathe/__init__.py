"""Lathe: fine-tune language models end to end from one YAML file."""

__version__ = "0.1.0"

from lathe.api import train  # noqa: E402  (light: heavy libraries load inside train())

__all__ = ["train", "__version__"]
