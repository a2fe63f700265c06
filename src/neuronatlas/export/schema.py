"""JSON Schemas of the rows Neuronpedia imports, one per table, written from its public source.

Neuronpedia (github.com/hijohnnylin/neuronpedia) publishes no JSON Schema for its import format; the
rows are Prisma models. Each schema below lists the scalar columns of one model in
``apps/webapp/prisma/schema.prisma`` (relations left out), with the Python shapes of
``utils/neuronpedia-utils/neuronpedia_utils/db_models/*.py`` that its own exporters write:
a column without a default and not optional is required, nullable columns (``?``) allow null,
and no other key is allowed (``prisma.create`` rejects unknown fields; the bulk importer of
``apps/webapp/lib/db/import.ts`` silently drops them). See docs/export.md.
"""

from __future__ import annotations

# Column type codes: S string, F number, I integer, B boolean, T date-time string, V visibility;
# a trailing [] is a list, a trailing ? allows null, a leading ! marks a required column.
TABLES: dict[str, dict[str, str]] = {
    "Activation": {
        "id": "!S", "tokens": "!S[]", "dataIndex": "S?", "index": "!S", "layer": "!S", "modelId": "!S",
        "dataSource": "S?", "maxValue": "!F", "maxValueTokenIndex": "!I", "minValue": "!F", "values": "!F[]",
        "dfaValues": "F[]", "dfaTargetIndex": "I?", "dfaMaxValue": "F?", "zQIndices": "I[]", "zKIndices": "I[]",
        "zValues": "F[]", "creatorId": "!S", "createdAt": "T", "lossValues": "F[]", "logitContributions": "S?",
        "binMin": "F?", "binMax": "F?", "binContains": "F?", "qualifyingTokenIndex": "I?",
    },
    "Neuron": {
        "modelId": "!S", "layer": "!S", "index": "!S", "sourceSetName": "S?", "creatorId": "S?", "createdAt": "T",
        "maxActApprox": "F?", "hasVector": "B", "vector": "F[]", "vectorLabel": "S?", "vectorDefaultSteerStrength": "F?",
        "hookName": "S?", "topkCosSimIndices": "I[]", "topkCosSimValues": "F[]", "neuron_alignment_indices": "I[]",
        "neuron_alignment_values": "F[]", "neuron_alignment_l1": "F[]", "correlated_neurons_indices": "I[]",
        "correlated_neurons_pearson": "F[]", "correlated_neurons_l1": "F[]", "correlated_features_indices": "I[]",
        "correlated_features_pearson": "F[]", "correlated_features_l1": "F[]", "neg_str": "S[]", "neg_values": "F[]",
        "pos_str": "S[]", "pos_values": "F[]", "frac_nonzero": "F", "freq_hist_data_bar_heights": "F[]",
        "freq_hist_data_bar_values": "F[]", "logits_hist_data_bar_heights": "F[]", "logits_hist_data_bar_values": "F[]",
        "decoder_weights_dist": "F[]", "umap_cluster": "I?", "umap_log_feature_sparsity": "F?", "umap_x": "F?",
        "umap_y": "F?",
    },
    "Explanation": {
        "id": "!S", "modelId": "!S", "layer": "!S", "index": "!S", "description": "!S", "authorId": "!S",
        "triggeredByUserId": "S?", "notes": "S?", "scoreV1": "F", "scoreV2": "F?", "umap_x": "F?", "umap_y": "F?",
        "umap_cluster": "I?", "umap_log_feature_sparsity": "F?", "typeName": "S?", "explanationModelName": "S?",
        "createdAt": "T", "updatedAt": "T",
    },
    "ExplanationScore": {
        "id": "!S", "initiatedByUserId": "!S", "value": "!F", "explanationId": "!S", "explanationScoreTypeName": "!S",
        "explanationScoreModelName": "!S", "jsonDetails": "S", "createdAt": "T",
    },
    "Model": {
        "id": "!S", "displayNameShort": "S", "displayName": "S", "creatorId": "!S", "tlensId": "S?", "openRouterId": "S?",
        "dimension": "I?", "thinking": "B", "visibility": "V", "defaultSourceSetName": "S?", "defaultSourceId": "S?",
        "defaultGraphSourceSetName": "S?", "inferenceEnabled": "B", "instruct": "B", "layers": "!I",
        "neuronsPerLayer": "!I", "createdAt": "T", "owner": "!S", "updatedAt": "T", "website": "S?",
    },
    "Source": {
        "id": "!S", "modelId": "!S", "hasDashboards": "B", "inferenceEnabled": "B", "saelensRelease": "S?",
        "saelensSaeId": "S?", "hfRepoId": "S?", "hfFolderId": "S?", "visibility": "V", "defaultOfModelId": "S?",
        "setName": "!S", "creatorId": "!S", "hasUmap": "B", "hasUmapLogSparsity": "B", "hasUmapClusters": "B",
        "num_prompts": "I?", "num_tokens_in_prompt": "I?", "dataset": "S?", "notes": "S?", "cosSimMatchModelId": "S?",
        "cosSimMatchSourceId": "S?", "createdAt": "T",
    },
    "SourceSet": {
        "modelId": "!S", "name": "!S", "hasDashboards": "B", "allowInferenceSearch": "B", "visibility": "V",
        "description": "!S", "type": "S", "creatorName": "!S", "urls": "!S[]", "creatorEmail": "S?", "creatorId": "!S",
        "releaseName": "S?", "hasGraphs": "B", "graphEnabled": "B", "similarityMatrixEnabled": "B",
        "defaultOfModelId": "S?", "defaultGraphModelId": "S?", "defaultRange": "I", "defaultShowBreaks": "B",
        "showDfa": "B", "showCorrelated": "B", "showHeadAttribution": "B", "showUmap": "B", "createdAt": "T",
    },
    "SourceRelease": {
        "name": "!S", "visibility": "V", "isNewUi": "B", "featured": "B", "description": "!S", "descriptionShort": "S?",
        "urls": "!S[]", "creatorEmail": "S?", "creatorName": "!S", "creatorNameShort": "S?", "creatorId": "!S",
        "defaultSourceSetName": "S?", "defaultSourceId": "S?", "defaultUmapSourceIds": "S[]", "createdAt": "T",
    },
}
SCALARS = {"S": {"type": "string"}, "F": {"type": "number"}, "I": {"type": "integer"}, "B": {"type": "boolean"},
           "T": {"type": "string", "format": "date-time"}, "V": {"enum": ["PUBLIC", "UNLISTED", "PRIVATE"]}}


def column_schema(code: str) -> dict:
    code = code.lstrip("!")
    nullable, code = code.endswith("?"), code.rstrip("?")
    schema = {"type": "array", "items": SCALARS[code[:-2]]} if code.endswith("[]") else dict(SCALARS[code])
    return {"anyOf": [schema, {"type": "null"}]} if nullable else schema


def table_schema(table: str) -> dict:
    """The JSON Schema (draft 2020-12) of one row of ``table``."""
    columns = TABLES[table]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"Neuronpedia {table} row",
        "type": "object",
        "properties": {name: column_schema(code) for name, code in columns.items()},
        "required": [name for name, code in columns.items() if code.startswith("!")],
        "additionalProperties": False,
    }
