"""A growing table of bad inputs, run through the real command line.

Every case must end with exit status 2 and one line on stderr (``neuronatlas: error: ...``) that names
the bad value, without a traceback, and must leave nothing behind: its output location stays empty
and the shared inputs stay as they were. Add every new bug's input here.

The fixtures (an atlas, neuron sets, a plan, broken files) are built once for the module; most cases
fail before any model loads. Placeholders in a case's argv: ``{model}`` ``{gpt2}`` ``{corpus}``
``{atlas}`` ``{set}`` ``{plan}`` inputs; ``{new}`` / ``{newjson}`` a fresh output path of the case;
``{file}`` an existing file, ``{folder}`` an existing non-empty folder, ``{missing}`` a path that
does not exist; the rest name broken inputs (see ``world``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from bad_inputs_world import broken_atlases, broken_files
from conftest import make_tokenizer
from test_models import tiny

from neuronatlas.cli import main
from neuronatlas.neuronset import NeuronSet

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


@dataclass(frozen=True)
class Case:
    id: str
    argv: str  # split on spaces, then each part formatted with the world's paths
    expect: tuple[str, ...] = ()  # substrings of the error line (the bad value, the flag, the fix)
    xfail: str | None = None  # why it fails today, and the fix it needs
    needs_non_root: bool = False  # permission cases: root writes anywhere

    @property
    def output_check(self) -> bool:
        """An output case must be refused before any model loads (else the work is lost)."""
        return any(tag in self.id for tag in ("-out-", "-json-", "-heatmap-", "-markdown-"))


P = "profile --model {model} --corpus {corpus} --label-field lang --device cpu --quiet --max-length 24 --out {new}"
P_NO_CORPUS = "profile --model {model} --device cpu --quiet --max-length 24 --out {new}"
M = "merge {atlas} --out {new}"
E = ("evaluate --model {model} --sets {set} --corpus {corpus} --label-field lang --device cpu --quiet "
     "--max-docs-per-label 2 --controls 0 --out {newjson}")
S = ("steer --model {model} --sets {set} --atlas {atlas} --from en --to de --corpus {corpus} --label-field lang "
     "--device cpu --quiet --prompts 2 --calibration 2")
X = "explain --atlas {atlas} --neurons {set} --explainer {model} --max-neurons 1 --device cpu --quiet --out {newjson}"
Z = "sparsify coreinfer --model {model} --device cpu --out {new}"
B = "bench --model {model} --device cpu --plan {plan} --runs 1 --new-tokens 2"
R = "report {atlas} --quiet -o {new}"
N = "export neuronpedia {atlas} --out {new}"
L = "find lape --atlas {atlas} --no-null --out {newjson}"
NO_OVERWRITE = "find/evaluate/steer/explain outputs: an existing file is replaced silently; add --overwrite and preflight_output"

CASES = [
    # --- profile: values ---------------------------------------------------------------------------
    Case("profile-threshold-nan", P + " --threshold nan", ("--threshold", "nan", "finite")),
    Case("profile-threshold-inf", P + " --threshold inf", ("--threshold", "inf")),
    Case("profile-threshold-text", P + " --threshold high", ("--threshold", "'high'")),
    Case("profile-top-k-negative", P + " --top-k -1", ("--top-k", "-1", "at least 0")),
    Case("profile-bottom-k-negative", P + " --bottom-k -1", ("--bottom-k", "-1", "at least 0")),
    Case("profile-bucket-batches-0", P + " --bucket-batches 0", ("--bucket-batches", "0", "at least 1")),
    Case("profile-batch-tokens-negative", P + " --batch-tokens -1", ("--batch-tokens", "-1")),
    Case("profile-batch-size-0", P + " --batch-size 0", ("--batch-size", "0", "at least 1")),
    Case("profile-batch-size-float", P + " --batch-size 2.5", ("--batch-size", "'2.5'")),
    Case("profile-max-length-1", P + " --max-length 1", ("--max-length", "1", "at least 2")),
    Case("profile-max-length-beyond-positions", P + " --max-length 4096", ("4096", "64")),
    Case("profile-doc-sample-negative", P + " --doc-sample -5", ("--doc-sample", "-5")),
    Case("profile-doc-pools-unknown", P + " --doc-pools mean,min", ("--doc-pools", "mean,min", "mean,max")),
    Case("profile-doc-pools-empty", P + " --doc-pools ,", ("--doc-pools", "','")),
    Case("profile-doc-format-unknown", P + " --doc-format int8", ("--doc-format", "int8", "ranks")),
    Case("profile-exemplar-radius-negative", P + " --exemplar-radius -1", ("--exemplar-radius", "-1")),
    Case("profile-window-bits-9", P + " --window-bits 9", ("--window-bits", "9", "2 to 8")),
    Case("profile-window-bits-1", P + " --window-bits 1", ("--window-bits", "1", "2 to 8")),
    Case("profile-checkpoint-every-negative", P + " --checkpoint-every -1", ("--checkpoint-every", "-1")),
    Case("profile-checkpoint-every-nan", P + " --checkpoint-every nan", ("--checkpoint-every", "nan")),
    Case("profile-dist-timeout-0", P + " --dist-timeout 0", ("--dist-timeout", "0", "positive")),
    Case("profile-padding-side", P + " --padding-side middle", ("--padding-side", "middle")),
    Case("profile-dtype", P + " --dtype int8", ("--dtype", "int8")),
    Case("profile-format", P + " --format xml", ("--format", "xml")),
    Case("profile-on-invalid-text", P + " --on-invalid-text skip", ("--on-invalid-text", "skip")),
    Case("profile-unknown-flag", P + " --bogus", ("--bogus",)),
    Case("profile-no-arguments", "profile", ("required", "--model")),
    Case("profile-device-map", P + " --device-map everywhere", ("--device-map", "everywhere")),
    # --- profile: inputs ---------------------------------------------------------------------------
    Case("profile-missing-model", "profile --model {missing} --corpus {corpus} --device cpu --out {new}", ("missing",)),
    Case("profile-model-is-a-file", "profile --model {file} --corpus {corpus} --device cpu --out {new}", ("exists.json",)),
    Case("profile-missing-corpus", P_NO_CORPUS + " --corpus {missing}.jsonl", ("missing.jsonl", "not found")),
    Case("profile-empty-corpus", P_NO_CORPUS + " --corpus {empty}", ("empty.jsonl", "no documents")),
    Case("profile-corpus-bad-json", P_NO_CORPUS + " --corpus {badjson}", ("badjson.jsonl", "line 2")),
    Case("profile-corpus-json-array", P_NO_CORPUS + " --corpus {jsonarray}", ("line 1", "array")),
    Case("profile-corpus-not-utf8", P_NO_CORPUS + " --corpus {latin1}", ("latin1.jsonl", "line 2", "UTF-8")),
    Case("profile-corpus-not-utf8-txt", P_NO_CORPUS + " --corpus {latin1txt}", ("latin1.txt", "line 1", "UTF-8")),
    Case("profile-corpus-lone-surrogate", P_NO_CORPUS + " --corpus {surrogate} --label-field lang",
         ("surrogate.jsonl", "line 2", "surrogate", "--on-invalid-text")),
    Case("profile-corpus-surrogate-label", P_NO_CORPUS + " --corpus {surrogate_label} --label-field lang",
         ("line 1", "'lang'", "surrogate")),
    Case("profile-corpus-text-not-string", P_NO_CORPUS + " --corpus {textnumber}", ("line 1", "int")),
    Case("profile-text-field-missing", P + " --text-field body", ("'body'",)),
    Case("profile-label-field-missing", P.replace("lang", "language"), ("'language'",)),
    Case("profile-label-null", P_NO_CORPUS + " --corpus {nulllabel} --label-field lang", ("line 1", "null")),
    Case("profile-label-field-on-txt", P_NO_CORPUS + " --corpus {latin1txt} --label-field lang", ("'lang'", "txt")),
    Case("profile-corpus-suffix", P_NO_CORPUS + " --corpus {file}.xml", ("not found",)),
    Case("profile-corpus-unknown-suffix", P_NO_CORPUS + " --corpus {xml}", ("'.xml'",)),
    Case("profile-label-from-folder-on-jsonl", P + " --label-from-folder", ("label_from_folder",)),
    Case("profile-folder-as-jsonl", P_NO_CORPUS + " --corpus {folder} --format jsonl", ("folder", "'jsonl'")),
    Case("profile-csv-missing-field", P_NO_CORPUS + " --corpus {csv} --text-field body", ("header", "'body'")),
    Case("profile-parquet-damaged", P_NO_CORPUS + " --corpus {badparquet}", ("bad.parquet", "parquet")),
    # --- profile: outputs --------------------------------------------------------------------------
    Case("profile-out-is-a-file", P.replace("{new}", "{file}"), ("exists.json", "is a file")),
    Case("profile-out-under-a-file", P.replace("{new}", "{file}/atlas"), ("exists.json", "is a file")),
    Case("profile-out-not-empty", P.replace("{new}", "{folder}"), ("full", "not empty")),
    Case("profile-out-holds-an-atlas", P.replace("{new}", "{atlas}"), ("already holds an atlas", "--overwrite")),
    Case("profile-out-read-only", P.replace("{new}", "{readonly}/atlas"), ("permission denied",), needs_non_root=True),
    Case("profile-resume-without-checkpoint", P + " --resume", ("--resume", "no checkpoint")),
    # --- info ----------------------------------------------------------------------------------------
    Case("info-not-an-atlas", "info {folder}", ("not an atlas",)),
    Case("info-missing", "info {missing}", ("missing",)),
    Case("info-a-file", "info {file}", ("exists.json",)),
    Case("info-newer-format", "info {atlas_v99}", ("format 99", "upgrade")),
    Case("info-broken-json", "info {atlas_badjson}", ("not a complete atlas",)),
    Case("info-truncated-stats", "info {atlas_truncated_stats}", ("not a complete atlas",)),
    Case("info-no-stats", "info {atlas_no_stats}", ("stats.safetensors",)),
    Case("info-unknown-flag", "info {atlas} --csv", ("--csv",)),
    Case("info-no-atlas", "info", ("needs an atlas", "ATLAS or --atlas ATLAS")),
    Case("info-two-atlases", "info {atlas} --atlas {folder}", ("two atlases", "give one")),
    Case("info-atlas-flag-missing", "info --atlas {missing}", ("missing",)),
    Case("serve-no-atlas", "serve --port 0", ("needs an atlas",)),
    Case("export-two-atlases", "export neuronpedia {atlas} --atlas {folder} --out {new}", ("two atlases",)),
    # --- merge ---------------------------------------------------------------------------------------
    Case("merge-the-same-atlas-twice", "merge {atlas} {atlas} --out {new}", ("twice",)),
    Case("merge-the-same-atlas-by-another-path", "merge {atlas} {atlas}/../atlas --out {new}", ("twice",)),
    Case("merge-the-same-corpus-twice", "merge {atlas} {atlas_copy} --out {new}", ("same corpus", "twice")),
    Case("merge-one-atlas", M, ("at least two",)),
    Case("merge-threshold-differs", "merge {atlas} {atlas_threshold} --out {new}", ("threshold", "0.5", "atlas_threshold")),
    Case("merge-top-k-differs", "merge {atlas} {atlas_top_k} --out {new}", ("top_k", "7")),
    Case("merge-hist-edges-differ", "merge {atlas} {atlas_hist} --out {new}", ("hist_edges",)),
    Case("merge-other-model", "merge {atlas} {atlas_other_model} --out {new}", ("different models",)),
    Case("merge-not-an-atlas", "merge {atlas} {folder} --out {new}", ("not an atlas",)),
    Case("merge-missing-part", "merge {atlas} {missing} --out {new}", ("missing",)),
    Case("merge-out-holds-an-atlas", "merge {atlas} {atlas_copy} --out {atlas}", ("already holds an atlas", "--overwrite")),
    Case("merge-out-is-a-file", "merge {atlas} {atlas_copy} --out {file}", ("is a file",)),
    Case("merge-out-not-empty", "merge {atlas} {atlas_copy} --out {folder}", ("not empty", "--overwrite")),
    Case("merge-no-out", "merge {atlas} {atlas_copy}", ("required", "--out")),
    # --- demo ----------------------------------------------------------------------------------------
    Case("demo-out-is-a-file", "demo --quiet --out {file}", ("is a file",)),
    Case("demo-out-under-a-file", "demo --quiet --out {file}/demo", ("is a file",)),
    Case("demo-out-foreign-folder", "demo --quiet --out {folder}", ("not empty", "demo")),
    Case("demo-unknown-flag", "demo --fast", ("--fast",)),
    # --- find ----------------------------------------------------------------------------------------
    Case("find-unknown-method", "find frobnicate --out {newjson}", ("frobnicate",)),
    Case("find-lape-not-an-atlas", L.replace("{atlas}", "{folder}"), ("not an atlas",)),
    Case("find-lape-missing-atlas", L.replace("{atlas}", "{missing}"), ("missing",)),
    Case("find-lape-top-rate-nan", L + " --top-rate nan", ("top rate", "nan", "(0, 1]")),
    Case("find-lape-top-rate-2", L + " --top-rate 2", ("top rate", "2.0", "(0, 1]")),
    Case("find-lape-percentile-1.5", L + " --percentile 1.5", ("percentile", "1.5", "(0, 1)")),
    Case("find-lape-signal", L + " --signal up", ("'up'", "gate or z")),
    Case("find-lape-out-is-a-folder", L.replace("{newjson}", "{folder}"), ("is a folder",)),
    Case("find-lape-out-under-a-file", L.replace("{newjson}", "{file}/set.json"), ("is a file",)),
    Case("find-lape-out-exists", L.replace("{newjson}", "{file}"), ("--overwrite",)),
    Case("find-lape-fdr-nan", "find lape --atlas {atlas} --fdr nan --out {newjson}", ("fdr", "nan", "(0, 1]")),
    Case("find-lape-fdr-2", "find lape --atlas {atlas} --fdr 2 --out {newjson}", ("fdr", "2.0", "(0, 1]")),
    Case("find-lape-permutations-negative", "find lape --atlas {atlas} --permutations -3 --out {newjson}",
         ("permutations", "-3", "at least 1")),
    Case("find-lape-min-docs-negative", "find lape --atlas {atlas} --min-docs -1 --out {newjson}",
         ("min docs", "-1", "at least 1")),
    Case("find-lape-label-field", L + " --label-field topic", ("topic",)),
    Case("find-dead-max-rate-nan", "find dead --atlas {atlas} --max-rate nan --out {newjson}", ("max rate", "nan", "[0, 1)")),
    Case("find-dead-max-rate-2", "find dead --atlas {atlas} --max-rate 2 --out {newjson}", ("max rate", "2.0", "[0, 1)")),
    Case("find-selectivity-top-k-0", "find selectivity --atlas {atlas} --no-null --top-k 0 --out {newjson}",
         ("top-k", "got 0", "at least 1")),
    Case("find-selectivity-metric", "find selectivity --atlas {atlas} --metric f1 --out {newjson}", ("--metric", "f1")),
    Case("find-selectivity-pool-not-kept", "find selectivity --atlas {atlas} --no-null --pool max --out {newjson}",
         ("no max pool", "--doc-pools mean,max", "--pool mean")),
    Case("find-probe-pool-not-kept", "find probe --atlas {atlas} --pool max --out {newjson}",
         ("no max pool", "--doc-pools mean,max")),
    Case("find-selectivity-unknown-label", "find selectivity --atlas {atlas} --no-null --label xx --out {newjson}", ("xx",)),
    Case("find-selectivity-named-label-too-rare", "find selectivity --atlas {atlas} --label de --min-docs 10000 --out {newjson}",
         ("label 'de'", "fewer than --min-docs 10000")),
    Case("find-tokens-corpus-without-model", "find tokens --atlas {atlas} --corpus {corpus} --out {newjson}",
         ("--corpus needs --model",)),
    Case("find-tokens-coverage-2", "find tokens --atlas {atlas} --no-null --coverage 2 --out {newjson}",
         ("coverage", "2.0", "(0, 1]")),
    Case("find-tokens-ngram", "find tokens --atlas {atlas} --ngram 3 --out {newjson}", ("--ngram", "3")),
    Case("find-tokens-other-model",  # advises the model the atlas was made with, not dropping a required flag
         "find tokens --atlas {atlas_other_model} --model {model} --device cpu --corpus {corpus} --no-null --out {newjson}",
         ("another model", "--model")),
    Case("find-positional-min-vr-nan", "find positional --atlas {atlas} --no-null --min-vr nan --out {newjson}",
         ("min variance explained", "nan")),
    Case("find-vocab-kind", "find vocab --model {model} --device cpu --kind both --out {newjson}", ("both",)),
    Case("find-vocab-kurtosis-nan", "find vocab --model {model} --device cpu --kurtosis nan --out {newjson}",
         ("--kurtosis", "nan")),
    Case("find-vocab-missing-model", "find vocab --model {missing} --device cpu --out {newjson}", ("missing",)),
    Case("find-weights-class", "find weights --model {model} --device cpu --class bogus --out {newjson}", ("bogus",)),
    Case("find-weights-threshold-nan", "find weights --model {model} --device cpu --class depletion --threshold nan "
         "--out {newjson}", ("threshold", "nan", "(0, 1)")),
    Case("find-attribution-surrogate", "find attribution --model {model} --device cpu --corpus {surrogate} "
         "--label-field lang --out {newjson}", ("surrogate.jsonl", "line 2")),
    Case("find-attribution-batch-0", "find attribution --model {model} --device cpu --corpus {corpus} --label-field lang "
         "--batch-size 0 --out {newjson}", ("--batch-size", "0")),
    Case("find-attribution-on-an-encoder", "find attribution --model {bert} --device cpu --corpus {corpus} "
         "--label-field lang --out {newjson}", ("find attribution", "next token", "encoder")),
    Case("find-entropy-check-on-an-encoder", "find entropy --model {bert} --device cpu --corpus {corpus} --out {newjson}",
         ("mean-ablation check", "encoder", "--check-docs 0")),
    Case("find-probe-out-is-a-folder", "find probe --atlas {atlas} --out {folder}", ("is a folder",)),
    Case("find-attribution-max-length-beyond-positions", "find attribution --model {model} --device cpu --corpus {corpus} "
         "--label-field lang --max-length 4096 --out {newjson}", ("4096", "64 positions", "--max-length 64")),
    Case("find-probe-max-length-beyond-positions", "find probe --model {model} --device cpu --corpus {corpus} "
         "--label-field lang --max-length 4096 --out {newjson}", ("4096", "64 positions", "--max-length 64")),
    Case("find-universal-max-length-beyond-positions", "find universal --model {model} --other {gpt2} --device cpu "
         "--corpus {corpus} --max-length 4096 --out {newjson}", ("4096", "64 positions", "--max-length 64")),
    Case("find-universal-max-length-1", "find universal --model {model} --other {gpt2} --device cpu --corpus {corpus} "
         "--max-length 1 --out {newjson}", ("--max-length", "1")),
    # --- vocab ---------------------------------------------------------------------------------------
    Case("vocab-layer-negative", "vocab --model {model} --device cpu --layer -1 --index 0", ("--layer", "-1")),
    Case("vocab-layer-text", "vocab --model {model} --device cpu --layer one --index 0", ("--layer", "'one'")),
    Case("vocab-layer-beyond", "vocab --model {model} --device cpu --layer 99 --index 0", ("99",)),
    Case("vocab-index-beyond", "vocab --model {model} --device cpu --layer 0 --index 9999", ("9999",)),
    Case("vocab-top-0", "vocab --model {model} --device cpu --layer 0 --index 0 --top 0", ("--top", "0")),
    Case("vocab-missing-model", "vocab --model {missing} --device cpu --layer 0 --index 0", ("missing",)),
    Case("vocab-no-index", "vocab --model {model} --layer 0", ("required", "--index")),
    # --- evaluate ------------------------------------------------------------------------------------
    Case("evaluate-out-is-a-folder", E.replace("{newjson}", "{folder}"), ("is a folder",)),
    Case("evaluate-out-under-a-file", E.replace("{newjson}", "{file}/eval.json"), ("is a file",)),
    Case("evaluate-out-exists", E.replace("{newjson}", "{file}"), ("--overwrite",)),
    Case("evaluate-heatmap-is-a-folder", E + " --heatmap {folder}", ("--heatmap", "is a folder")),
    Case("evaluate-markdown-under-a-file", E + " --markdown {file}/eval.md", ("--markdown", "is a file")),
    Case("evaluate-set-kept-no-neuron", E.replace("{set}", "{emptyset}"), ("emptyset.json", "is empty", "--no-null")),
    Case("evaluate-controls-negative", E + " --controls -1", ("controls", "-1")),
    Case("evaluate-batch-size-0", E + " --batch-size 0", ("--batch-size", "0")),
    Case("evaluate-max-length-1", E + " --max-length 1", ("--max-length", "1")),
    Case("evaluate-max-length-beyond-positions", E + " --max-length 4096", ("4096", "64 positions", "--max-length 64")),
    Case("evaluate-max-docs-0", E + " --max-docs-per-label 0", ("max docs per label", "0")),
    Case("evaluate-op", E + " --op double", ("--op", "double")),
    Case("evaluate-value-nan", E + " --op constant --value nan", ("--value", "nan")),
    Case("evaluate-mean-without-atlas", E + " --op mean", ("--atlas",)),
    Case("evaluate-sets-missing", E.replace("{set}", "{missing}"), ("missing",)),
    Case("evaluate-sets-not-json", E.replace("{set}", "{notjson}"), ("bad.json",)),
    Case("evaluate-corpus-surrogate", E.replace("{corpus}", "{surrogate}"), ("surrogate.jsonl", "line 2")),
    # --- steer ---------------------------------------------------------------------------------------
    Case("steer-strength-nan", S + " --strength nan", ("--strength", "nan")),
    Case("steer-strength-inf", S + " --strength inf", ("--strength", "inf")),
    Case("steer-prompts-0", S + " --prompts 0", ("prompts", "got 0")),
    Case("steer-max-new-tokens-0", S + " --max-new-tokens 0", ("max new tokens", "got 0")),
    Case("steer-unknown-label", S.replace("--from en", "--from xx"), ("xx",)),
    Case("steer-label-kept-no-neuron", S.replace("{set}", "{emptyset}"), ("--from en", "kept no neuron", "--no-null")),
    Case("steer-mode", S + " --mode multiply", ("--mode", "multiply")),
    Case("steer-json-is-a-folder", S + " --json {folder}", ("--json", "is a folder")),
    Case("steer-json-under-a-file", S + " --json {file}/steer.json", ("--json", "is a file")),
    Case("steer-sets-missing", S.replace("{set}", "{missing}"), ("missing",)),
    Case("steer-on-an-encoder", S.replace("--model {model}", "--model {bert}"), ("steer", "text generation", "encoder")),
    Case("steer-corpus-surrogate", S.replace("{corpus}", "{surrogate}"), ("surrogate.jsonl", "line 2")),
    # --- explain -------------------------------------------------------------------------------------
    Case("explain-not-an-atlas", X.replace("{atlas}", "{folder}"), ("not an atlas",)),
    Case("explain-neurons-missing", X.replace("{set}", "{missing}"), ("missing",)),
    Case("explain-neurons-not-json", X.replace("{set}", "{notjson}"), ("bad.json",)),
    Case("explain-top-0", X + " --top 0", ("--top", "0")),
    Case("explain-holdout-negative", X + " --holdout -1", ("--holdout", "-1")),
    Case("explain-temperature-nan", X + " --temperature nan", ("--temperature", "nan")),
    Case("explain-timeout-0", X + " --timeout 0", ("--timeout", "0")),
    Case("explain-active-2", X + " --active 2", ("--active", "2")),
    Case("explain-scorers", X + " --scorers vibes", ("vibes",)),
    Case("explain-out-is-a-folder", X.replace("{newjson}", "{folder}"), ("is a folder",)),
    Case("explain-out-under-a-file", X.replace("{newjson}", "{file}/expl.json"), ("is a file",)),
    # --- export --------------------------------------------------------------------------------------
    Case("export-not-an-atlas", N.replace("{atlas}", "{folder}"), ("not an atlas",)),
    Case("export-out-is-a-file", N.replace("{new}", "{file}"), ("exists.json",)),
    Case("export-context-negative", N + " --context -1", ("--context", "-1")),
    Case("export-explanations-missing", N + " --explanations {missing}", ("missing",)),
    Case("export-unknown-format", "export csv --out {new}", ("csv",)),
    # --- serve (each fails before listening) ---------------------------------------------------------
    Case("serve-not-an-atlas", "serve {folder}", ("not an atlas",)),
    Case("serve-missing-atlas", "serve {missing}", ("missing",)),
    Case("serve-port-text", "serve {atlas} --port http", ("--port", "'http'")),
    Case("serve-sets-missing", "serve {atlas} --sets {missing}", ("missing",)),
    Case("serve-sets-not-json", "serve {atlas} --sets {notjson}", ("bad.json",)),
    Case("serve-port-beyond", "serve {atlas} --port 70000", ("70000",)),
    Case("serve-max-tokens-0", "serve {atlas} --max-tokens 0", ("--max-tokens", "0")),
    Case("serve-truncated-exemplars", "serve {atlas_truncated_exemplars}", ("exemplars.parquet",)),
    # --- report --------------------------------------------------------------------------------------
    Case("report-not-an-atlas", R.replace("{atlas}", "{folder}"), ("not an atlas",)),
    Case("report-out-is-a-file", R.replace("{new}", "{file}"), ("exists.json",)),
    Case("report-out-not-empty", R.replace("{new}", "{folder}"), ("--overwrite",)),
    Case("report-max-pages-0", R + " --max-pages 0", ("--max-pages", "0")),
    Case("report-sets-missing", R + " --sets {missing}", ("missing",)),
    Case("report-neurons-not-json", R + " --neurons {notjson}", ("bad.json",)),
    Case("report-truncated-exemplars", R.replace("{atlas}", "{atlas_truncated_exemplars}"), ("exemplars.parquet",)),
    Case("report-deleted-exemplars", R.replace("{atlas}", "{atlas_no_exemplars}"), ("exemplars.parquet",)),
    Case("info-truncated-exemplars", "info {atlas_truncated_exemplars}", ("exemplars.parquet",)),
    # --- sparsify ------------------------------------------------------------------------------------
    Case("sparsify-sparsity-1.5", Z + " --sparsity 1.5", ("--sparsity", "1.5", "[0, 1)")),
    Case("sparsify-sparsity-nan", Z + " --sparsity nan", ("--sparsity", "nan", "[0, 1)")),
    Case("sparsify-sparsity-1", Z + " --sparsity 1", ("--sparsity", "[0, 1)")),
    Case("sparsify-ppl-within-on-an-encoder",
         "sparsify teal --model {bert} --device cpu --corpus {corpus} --ppl-within 1 --out {new}",
         ("--ppl-within", "bert", "encoder")),
    Case("sparsify-out-holds-a-plan", Z.replace("{new}", "{plan}"), ("not empty", "--overwrite")),
    Case("sparsify-out-is-a-file", Z.replace("{new}", "{file}"), ("is a file",)),
    Case("sparsify-out-under-a-file", Z.replace("{new}", "{file}/plan"), ("is a file",)),
    Case("sparsify-out-read-only", Z.replace("{new}", "{readonly}/plan"), ("permission denied",), needs_non_root=True),
    Case("sparsify-alpha-0", Z + " --alpha 0", ("--alpha", "(0, 1]")),
    Case("sparsify-alpha-nan", Z + " --alpha nan", ("--alpha", "nan")),
    Case("sparsify-experts-0", "sparsify moe --model {model} --device cpu --experts 0 --out {new}", ("--experts", "0")),
    Case("sparsify-calib-tokens-0", Z + " --calib-tokens 0", ("--calib-tokens", "0")),
    Case("sparsify-threads-0", Z + " --threads 0", ("--threads", "0")),
    Case("sparsify-ppl-within-nan", Z + " --ppl-within nan --corpus {corpus}", ("--ppl-within", "nan")),
    Case("sparsify-ppl-within-without-corpus", Z + " --ppl-within 1", ("--ppl-within", "--corpus")),
    Case("sparsify-hot-without-atlas", "sparsify hot --model {model} --device cpu --out {new}", ("--atlas",)),
    Case("sparsify-cats-on-an-ungated-family", "sparsify cats --model {gpt2} --device cpu --corpus {corpus} --out {new}",
         ("cats", "gpt2's MLP has no gate", "teal")),
    Case("sparsify-cats-without-corpus", "sparsify cats --model {model} --device cpu --out {new}", ("cats", "--corpus")),
    Case("sparsify-method", "sparsify fast --model {model} --out {new}", ("fast",)),
    Case("sparsify-layers-backwards", Z + " --layers 5-2", ("5-2", "backwards")),
    Case("sparsify-prefill", Z + " --prefill none", ("--prefill", "none")),
    Case("sparsify-missing-model", "sparsify coreinfer --model {missing} --device cpu --out {new}", ("missing",)),
    # --- bench ---------------------------------------------------------------------------------------
    Case("bench-runs-0", B + " --runs 0", ("--runs", "0")),
    Case("bench-new-tokens-1", B + " --new-tokens 1", ("--new-tokens", "1")),
    Case("bench-max-length-3", B + " --max-length 3", ("--max-length", "3")),
    Case("bench-max-length-beyond-positions", B + " --corpus {corpus} --max-length 4096",
         ("4096", "64 positions", "--max-length 64")),
    Case("bench-max-windows-0", B + " --max-windows 0", ("--max-windows", "0")),
    Case("bench-label-field-without-corpus", B + " --label-field lang", ("--label-field", "--corpus")),
    Case("bench-label-field-missing", B + " --corpus {corpus} --label-field topic", ("topic", "--label-field", "lang")),
    Case("bench-threads-0", B + " --threads 0", ("--threads", "0")),
    Case("bench-json-is-a-folder", B + " --json {folder}", ("--json", "is a folder")),
    Case("bench-json-exists", B + " --json {file}", ("--json", "--overwrite")),
    Case("bench-json-under-a-file", B + " --json {file}/bench.json", ("--json", "is a file")),
    Case("bench-plan-missing", B.replace("{plan}", "{missing}"), ("missing",)),
    Case("bench-plan-not-a-plan", B.replace("{plan}", "{folder}"), ("full",)),
    Case("bench-sweep-text", B + " --corpus {corpus} --sweep 0.5,x", ("--sweep", "0.5,x")),
    Case("bench-sweep-out-of-range", B + " --corpus {corpus} --sweep 0.5,1.5", ("1.5", "[0, 1)")),
    Case("bench-sweep-without-corpus", B + " --sweep 0.5", ("--sweep", "--corpus")),
    Case("bench-plan-of-another-model", B.replace("{model}", "{gpt2}"), ("plan was made for model",)),
]


def _marks(case: Case):
    marks = []
    if case.xfail:
        marks.append(pytest.mark.xfail(strict=True, reason=case.xfail))
    if case.needs_non_root and ROOT:
        marks.append(pytest.mark.skip(reason="root may write in a read-only folder"))
    return marks


# --- the shared inputs (built by bad_inputs_world) ---------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama, tiny_gpt2, corpus_path):
    """Every path a case's argv may name, built once: an atlas with its set and plan, and broken inputs."""
    root = tmp_path_factory.mktemp("bad-inputs")
    atlas = root / "atlas"
    common = ["--device", "cpu", "--quiet"]
    assert main(["profile", "--model", str(tiny_llama), "--corpus", str(corpus_path), "--label-field", "lang",
                 "--out", str(atlas), "--max-length", "24", *common]) == 0
    assert main(["find", "lape", "--atlas", str(atlas), "--no-null", "--top-rate", "0.2", "--out",
                 str(root / "set.json")]) == 0
    assert main(["sparsify", "coreinfer", "--model", str(tiny_llama), "--device", "cpu", "--out", str(root / "plan")]) == 0
    bert = root / "bert"  # an encoder: the verbs that need next-token loss refuse it
    tiny("bert")[0].save_pretrained(bert)
    make_tokenizer(bert)
    # what find lape writes when its null keeps nothing (a random model): labels tested, no neuron kept
    NeuronSet("lape", {}, [], null={"method": "lape", "fdr": 0.05}, tested_labels=["de", "en"]).save(root / "emptyset.json")
    paths = {"model": tiny_llama, "gpt2": tiny_gpt2, "corpus": corpus_path, "atlas": atlas, "set": root / "set.json",
             "emptyset": root / "emptyset.json", "bert": bert,
             "plan": root / "plan", **broken_atlases(root, atlas), **broken_files(root)}
    yield {key: str(path) for key, path in paths.items()}, root
    (root / "readonly").chmod(0o755)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(path): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(root.rglob("*")) if "cases" not in path.relative_to(root).parts}


def run_case(case: Case, world, capsys) -> tuple[int, str]:
    paths, root = world
    case_dir = root / "cases" / case.id
    case_dir.mkdir(parents=True)
    names = dict(paths, new=str(case_dir / "out"), newjson=str(case_dir / "out.json"))
    argv = [part.format(**names) for part in case.argv.split(" ")]
    before = _snapshot(root)
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        if case.output_check:
            _refuse_model_loading(patch)
        status = main(argv)  # an exception other than the CLI's own is a traceback: the case fails
    err = capsys.readouterr().err.strip()
    assert status == 2, (status, err)
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("neuronatlas: error: "), err
    assert len(err) < 400, f"{len(err)} characters: {err}"
    assert list(case_dir.iterdir()) == [], f"left behind: {list(case_dir.iterdir())}"
    assert _snapshot(root) == before, "an input or an existing output was changed"
    return status, err


def _model_loaded(*args, **kwargs):
    raise AssertionError("a model was loaded before the output was checked: the work would be lost")


def _refuse_model_loading(patch: pytest.MonkeyPatch) -> None:
    import neuronatlas.loading
    import neuronatlas.profile.loader

    patch.setattr(neuronatlas.loading, "load_model", _model_loaded)
    patch.setattr(neuronatlas.profile.loader, "load_model", _model_loaded)


def _would_listen(*args, **kwargs):
    raise AssertionError("serve got past its checks and would listen")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """A path that does not exist must not become a Hugging Face download; serve never listens."""
    import neuronatlas.viewer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(neuronatlas.viewer, "serve", _would_listen)


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id, marks=_marks(case)) for case in CASES])
def test_bad_input(case: Case, world, capsys):
    _, err = run_case(case, world, capsys)
    for part in case.expect:
        assert part in err, (part, err)


def test_the_table_covers_every_command():
    from neuronatlas.cli import VERBS

    verbs = {verb.__name__.rsplit(".", 1)[-1] for verb in VERBS}
    covered = {case.argv.split(" ", 1)[0] for case in CASES}
    assert verbs <= covered, verbs - covered
    assert len(CASES) >= 120 and len({case.id for case in CASES}) == len(CASES)


# --- the shell ----------------------------------------------------------------------------------------


def _console(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "neuronatlas", *args], capture_output=True, text=True, env=env,
                          timeout=120, **kwargs)


def test_a_closed_stdout_ends_quietly(world):
    paths, _ = world
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    command = f"{sys.executable} -m neuronatlas info {paths['atlas']} | head -1"
    done = subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.stdout.startswith("model ") and len(done.stdout.splitlines()) == 1
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.stderr == ""


def test_a_bad_flag_from_the_shell_is_one_line(world):
    paths, _ = world
    done = _console("merge", paths["atlas"], paths["atlas"], "--out", paths["missing"], "--top", "x")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--top" in done.stderr and "usage:" not in done.stderr


def test_a_profile_refused_at_once_from_the_shell_exits_2_not_an_abort(world):
    """The profiler's kernels load on a thread from its import: a process that ended during that load
    aborted in C++ teardown (status 134, "terminate called without an active exception")."""
    paths, root = world
    missing = root / "no-such-corpus.jsonl"
    done = _console("profile", "--model", paths["model"], "--corpus", str(missing), "--out", str(root / "never"))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "terminate" not in done.stderr and str(missing) in done.stderr
