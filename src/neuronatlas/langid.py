"""The language of a text, judged by a maintained identifier that ships its model: py3langid.

py3langid (the packaged langid.py of Lui & Baldwin 2012: a naive Bayes model over byte n-grams,
trained on 97 languages, shipped inside the wheel) names ISO 639-1 codes (``en``, ``de``,
``es``, ``ar``, ``ru``, ...). Steering labels must be such codes. By default every one of its 97
languages is a possible answer, so a continuation that drifts into a third language counts as
that language, not as the nearest of the steering pair.

    >>> identifier = language_identifier()                         # doctest: +SKIP
    >>> identifier.predict(["der Hund lief zum Haus", "el perro"])  # doctest: +SKIP
    ['de', 'es']
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache

from .errors import NeuronAtlasError

NAME = "py3langid"


class LanguageIdentifier:
    """py3langid's model, over all its languages or restricted to ``languages``."""

    def __init__(self, languages: Sequence[str] | None = None):
        from py3langid.langid import MODEL_FILE, LanguageIdentifier as Model

        self.model = Model.from_model_file(MODEL_FILE)
        known = tuple(self.model.nb_classes)
        if languages is not None:
            unknown = sorted(set(languages) - set(known))
            if unknown:
                raise NeuronAtlasError(f"{NAME} knows no language {', '.join(map(repr, unknown))}; it knows "
                                       f"ISO 639-1 codes: {', '.join(sorted(known))}")
            self.model.set_languages(list(languages))
        self.labels = tuple(self.model.nb_classes)

    @property
    def name(self) -> str:
        return NAME

    def describe(self) -> dict:
        """What the result JSON records about the identifier."""
        from importlib.metadata import version

        return {"name": NAME, "version": version(NAME), "languages": len(self.labels)}

    def check(self, labels: Iterable[str], what: str = "label") -> None:
        """Raise a one-line error for a label the identifier cannot name."""
        unknown = [label for label in labels if label not in self.labels]
        if unknown:
            raise NeuronAtlasError(
                f"the language identifier ({NAME}) cannot judge {what} {', '.join(map(repr, unknown))}: it names "
                f"ISO 639-1 codes ({', '.join(sorted(self.labels)[:12])}, ... {len(self.labels)} in all); "
                "label the corpus with such codes"
            )

    def predict(self, texts: Sequence[str]) -> list[str]:
        """The most likely language of each text."""
        return [self.model.classify(text)[0] for text in texts]


@lru_cache(maxsize=4)
def language_identifier(languages: tuple[str, ...] | None = None) -> LanguageIdentifier:
    """The identifier (loaded once per ``languages``; None = all 97)."""
    return LanguageIdentifier(languages)


__all__ = ["LanguageIdentifier", "language_identifier", "NAME"]
