"""Exemplars that teach: near-duplicate windows merged for display (the best kept, the rest counted)."""

from __future__ import annotations

SIMILAR = 0.7  # Jaccard similarity of two windows' token sets at which they count as the same text


def merge_near_duplicates(exemplars: list[dict], similarity: float = SIMILAR) -> list[dict]:
    """Mark near-duplicates among ``exemplars`` (best first), in place, and return them.

    Two windows are near-duplicates when their texts are equal up to case and whitespace, or their
    token-id sets overlap by at least ``similarity`` (Jaccard): the same line met again, or met with
    its peak a few tokens on. Each exemplar gains ``repeats`` (how many exemplars it stands for: 1 +
    those merged into it; 0 when merged) and ``merged_into`` (the rank of the one kept, else None).
    """
    kept: list[tuple[dict, str, set[int]]] = []  # (exemplar, normalised text, token ids)
    for item in exemplars:
        text, tokens = " ".join(item["text"].split()).casefold(), set(item["token_ids"])
        for other, other_text, other_tokens in kept:
            same_text = bool(text) and text == other_text
            overlap = len(tokens & other_tokens) / len(tokens | other_tokens) if tokens and other_tokens else 0.0
            if same_text or overlap >= similarity:
                other["repeats"] += 1
                item.update(repeats=0, merged_into=other["rank"])
                break
        else:
            item.update(repeats=1, merged_into=None)
            kept.append((item, text, tokens))
    return exemplars
