"""Qubax Images: an OpenAI-compatible image generation gateway."""

from importlib.metadata import version

# The installed distribution's version (pyproject.toml's), so `qubax --version`, the OpenAPI schema and
# this never disagree.
__version__ = version("qubax")
