"""The built-in catalog's models, as the server loads them (its shipped file, through the catalog loader)."""

from qubax.catalog_file import load_catalog
from qubax.providers.registry import PROVIDERS

MODELS = load_catalog(None, set(PROVIDERS), {}).models
