"""BERT, RoBERTa and their kin (XLM-R, ELECTRA, MPNet, DeBERTa-v2, ...):
``output.dense(intermediate_act_fn(intermediate.dense(x)))`` per encoder layer."""

from .base import Site

SITE = Site(
    model_types=("bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm", "electra",
                 "ernie", "megatron-bert", "mpnet", "deberta-v2"),
    blocks=("encoder.layer",),
    down="output.dense",
    act="intermediate.intermediate_act_fn",
    up="intermediate.dense",
    encoder=True,
    final_norm=(),  # post-LN: each layer ends in its own LayerNorm; the MLM head has one more
)
