"""The built-in catalog's models, as the server loads them (its shipped file, through the catalog loader)."""

from qubax.providers.registry import PROVIDERS
from qubax.routing.catalog_file import load_catalog

MODELS = load_catalog(None, set(PROVIDERS), {}).models
