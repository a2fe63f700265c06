"""Export an atlas (and its explanations) for other tools: Neuronpedia's import folders. See docs/export.md."""

from .neuronpedia import FILES, export_neuronpedia, model_id_of
from .schema import TABLES, table_schema

__all__ = ["FILES", "TABLES", "export_neuronpedia", "model_id_of", "table_schema"]
