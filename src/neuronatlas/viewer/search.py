"""Search neurons by token, vocabulary projection, label, method or the words of an explanation."""

from __future__ import annotations

import math
from collections import OrderedDict

from .data import VIEWER_LAPE, AtlasData
from .live import LiveModel, ModelUnavailable

KINDS = {
    "token": "peak token of an exemplar",
    "promotes": "token the neuron promotes",
    "label": "label (LAPE and the neuron sets given)",
    "method": "method (or name) of a neuron set",
    "explanation": "words of an explanation",
}
COLUMNS = {
    "token": ["exemplars", "activation"],
    "promotes": ["token", "logit"],
    "label": ["label", "set", "method", "score"],
    "method": ["label", "set", "method", "score"],
    "explanation": ["explanation", "score", "source"],
}
PER_PAGE = 50
PROMOTING_LIMIT = 1000  # neurons listed for a "promotes" search
CACHED_QUERIES = 64


class Searcher:
    """Runs searches and keeps the last results, so that turning pages does not query again."""

    def __init__(self, data: AtlasData, model: LiveModel | None, per_page: int = PER_PAGE):
        self.data, self.model, self.per_page = data, model, per_page
        self._cache: OrderedDict[tuple[str, str], list[dict]] = OrderedDict()

    def search(self, by: str, q: str, page: int = 1) -> dict:
        """{"by", "q", "page", "pages", "total", "results" (this page's), "note", "error"}."""
        by = by if by in KINDS else "token"
        q = (q or "").strip()
        result = {"by": by, "q": q, "page": 1, "pages": 0, "total": 0, "results": [], "note": None, "error": None}
        if not q:
            return result
        try:
            found = self._found(by, q)
        except ModelUnavailable as error:
            return dict(result, error=str(error))
        pages = max(1, math.ceil(len(found) / self.per_page))
        page = min(max(1, page), pages)
        rows = found[(page - 1) * self.per_page : page * self.per_page]
        note = self._nothing_found(q) if by == "token" and not found else self._note(by)
        return dict(result, page=page, pages=pages, total=len(found), results=rows, note=note)

    def _found(self, by: str, q: str) -> list[dict]:
        key = (by, q.casefold())
        if key not in self._cache:
            self._cache[key] = self._query(by, q)
            if len(self._cache) > CACHED_QUERIES:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def _query(self, by: str, q: str) -> list[dict]:
        data = self.data
        if by == "token":
            return data.neurons_peaking_on(data.token_ids_matching(q))
        if by == "promotes":
            if self.model is None:
                raise ModelUnavailable("no model given: searching the vocabulary projection needs the atlas's model")
            found = self.model.neurons_promoting(self.model.vocabulary_ids(q), PROMOTING_LIMIT)
            return [dict(row, token=q) for row in found]
        if by == "label":
            return data.neurons_of_sets(label=q)
        if by == "method":
            return data.neurons_of_sets(method=q)
        return data.neurons_explained_by(q)

    def _note(self, by: str) -> str | None:
        if by in ("label", "method"):
            return self._sets_note()
        if by == "explanation" and not self.data.explanations:
            return "No explanations were given (serve with --explanations EXPL.json)."
        if by == "promotes":
            return f"Neurons whose value vector gives the token the highest logit (W_U[t] · w_out), at most {PROMOTING_LIMIT}."
        return None

    def _nothing_found(self, q: str) -> str:
        """Why a token search found no neuron: no such token in the atlas's windows, or no exemplar peak on it."""
        ids = self.data.token_ids_matching(q)
        if ids:
            return (f"{len(ids)} token(s) of the atlas's exemplar windows read {q!r}, but no exemplar peaks on "
                    "them: no neuron's top exemplars are on this token.")
        return (f"No token of the atlas's exemplar windows reads {q!r}: a word may be split into several "
                "tokens (search one of them), or never be in an exemplar's window.")

    def _sets_note(self) -> str:
        """Which sets a label or method search looks in."""
        data = self.data
        names = [name for name, _ in data.sets] + ([VIEWER_LAPE] if data.viewer_lape else [])
        searched = f"Searches {', '.join(names)}." if names else "No neuron sets to search."
        given = "" if data.sets else " No neuron sets were given (serve with --sets SET.json)."
        return f"{searched}{given} {data.viewer_lape_note}"
