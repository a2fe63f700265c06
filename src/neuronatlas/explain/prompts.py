"""The text the explainer and the simulator read (Bills et al. 2023's format, shortened to fit small models).

Excerpts are listed one token per line as ``token<TAB>activation`` with activations discretised to
0-10. The explainer continues "the main thing this neuron does is find"; the simulator sees the
same cue completed with the explanation, then the tokens of one excerpt to fill in.
"""

from __future__ import annotations

import json

EXPLAIN_INTRO = (
    "We study neurons of a neural network. Each neuron looks for one particular thing in a text. "
    "Texts are listed as token<tab>activation lines, activations from 0 to 10. "
    "Say in one short phrase what the neuron looks for.\n"
)
CUE = "Explanation: the main thing this neuron does is find"
SIMULATE_INTRO = (
    "We study neurons of a neural network. From the explanation of a neuron, predict its activation "
    "from 0 to 10 on each token, as token<tab>activation lines.\n"
)
SLOT = "unknown"  # what stands in a simulated token's activation slot (the paper's all-at-once method)
EXPLAIN_SYSTEM = "You explain neurons of neural networks. Answer with one short phrase and nothing else."
SIMULATE_SYSTEM = "You predict the activations of a neuron of a neural network. Answer with JSON only."

Excerpt = tuple[list[str], list[int]]  # tokens, activations 0-10


def show_token(token: str) -> str:
    """A token on one line: newlines and tabs written as escapes."""
    return token.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def excerpt_lines(tokens: list[str], levels: list[int]) -> str:
    return "".join(f"{show_token(token)}\t{level}\n" for token, level in zip(tokens, levels))


def explanation_prompt(excerpts: list[Excerpt]) -> str:
    parts = [EXPLAIN_INTRO]
    for number, (tokens, levels) in enumerate(excerpts, 1):
        parts.append(f"\nText {number}:\n{excerpt_lines(tokens, levels)}")
    parts.append(f"\n{CUE}")
    return "".join(parts)


def simulation_intro(explanation: str) -> str:
    """Everything before the token lines of the local simulator's prompt."""
    return f"{SIMULATE_INTRO}{CUE} {explanation}\n\nActivations:\n"


def chat_simulation_prompt(explanation: str, tokens: list[str]) -> str:
    listed = "".join(f"{number}\t{show_token(token)}\n" for number, token in enumerate(tokens, 1))
    example = json.dumps({"activations": [0] * min(len(tokens), 3)})
    return (
        f"{SIMULATE_INTRO}{CUE} {explanation}\n\n"
        f"The text has {len(tokens)} tokens, one per line as number<tab>token:\n{listed}\n"
        f"Reply with JSON only: an object whose \"activations\" list holds exactly {len(tokens)} integers "
        f"from 0 to 10, one per token in order, like {example} for 3 tokens."
    )


# ---- detection and fuzzing (delphi's classifier scorers) ----------------------------------------

JUDGE_QUESTIONS = {
    "detection": "Does the neuron fire on some token of this text?",
    "fuzzing": "Some tokens of this text are marked <<like this>>. Are the marked tokens the ones the neuron fires on?",
}
JUDGE_SYSTEM = "You check explanations of neurons of neural networks. Answer exactly as asked."


def judge_prompt(explanation: str, text: str, task: str) -> str:
    """One text to judge (local model: the answer is the next word, Yes or No)."""
    return (f"A neuron of a language model has this explanation: the main thing it does is find {explanation}.\n\n"
            f"Text: {one_line(text)}\n\n{JUDGE_QUESTIONS[task]} Answer Yes or No.")


def chat_judge_prompt(explanation: str, texts: list[str], task: str) -> str:
    """Several texts at once (chat endpoints, as delphi batches them): a JSON list of 0/1 back."""
    listed = "".join(f"Example {number}: {one_line(text)}\n" for number, text in enumerate(texts, 1))
    return (f"A neuron of a language model has this explanation: the main thing it does is find {explanation}.\n\n"
            f"{listed}\nFor each example: {JUDGE_QUESTIONS[task]} Reply with JSON only: a list of exactly "
            f"{len(texts)} numbers, 1 for yes and 0 for no, in order, like {json.dumps([1, 0, 0][:len(texts)])}.")


def one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")
