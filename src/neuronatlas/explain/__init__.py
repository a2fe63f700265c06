"""Automatic neuron explanations (Bills et al. 2023): explain, simulate, score; delphi's detection and
fuzzing scores (AUROC of a local judge's log-odds, on quantile-band and non-activating samples),
best-of-N sampling and a shuffled-explanation baseline; and multi-concept descriptions by
clustering a neuron's exemplars (PRISM). See docs/explain.md.

>>> from neuronatlas.explain import ExplainOptions, explain_neurons, open_backend  # doctest: +SKIP
>>> backend = open_backend("path/to/causal-lm")  # doctest: +SKIP
>>> explain_neurons("ATLAS", [(3, 17)], backend, backend, "EXPL.json", ExplainOptions())  # doctest: +SKIP
"""

from .exemplars import Exemplar, SubjectModel, load_subject
from .llm import ChatEndpoint, LocalModel, open_backend
from .run import ExplainOptions, explain_neurons
from .score import Scores, correlation, score
from .scorers import auroc, balanced_accuracy, context_text, judged

__all__ = ["ChatEndpoint", "Exemplar", "ExplainOptions", "LocalModel", "Scores", "SubjectModel", "auroc", "balanced_accuracy",
           "context_text", "correlation", "explain_neurons", "judged", "load_subject", "open_backend", "score"]
