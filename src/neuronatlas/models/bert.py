"""BERT / RoBERTa: ``output.dense(intermediate_act_fn(intermediate.dense(x)))`` per encoder layer."""

from .base import Site

SITE = Site(
    model_types=("bert", "roberta"),
    blocks=("encoder.layer",),
    down="output.dense",
    act="intermediate.intermediate_act_fn",
    up="intermediate.dense",
    encoder=True,
    final_norm=(),  # post-LN: each layer ends in its own LayerNorm; the MLM head has one more
)
