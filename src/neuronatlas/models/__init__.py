"""Model families: one small adapter file per family names where its neurons live.

To add a family, see docs/adding-a-family.md: write ``models/<family>.py`` with a ``SITE`` and
add the module to ``_ADAPTERS`` below.
"""

from __future__ import annotations

from importlib import import_module

from torch import nn

from ..errors import NeuronAtlasError
from .base import LayerNeurons, ModelNeurons, Site

_ADAPTERS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "phi", "nemotron", "gpt2", "gpt_neox", "bloom", "gptj",
             "starcoder2", "mpt", "opt", "bert", "distilbert", "modernbert")

ADDING_A_FAMILY_DOC = "docs/adding-a-family.md"


def sites() -> dict[str, Site]:
    """{config.model_type: Site} for every supported family."""
    table = {}
    for name in _ADAPTERS:
        site = import_module(f"{__name__}.{name}").SITE
        for model_type in site.model_types:
            table[model_type] = site
    return table


def supported_model_types() -> list[str]:
    return sorted(sites())


def site_for(model_type: str) -> Site:
    table = sites()
    if model_type not in table:
        raise NeuronAtlasError(
            f"unsupported model family {model_type!r}; supported: {', '.join(sorted(table))} "
            f"(to add one, see {ADDING_A_FAMILY_DOC})"
        )
    return table[model_type]


def is_encoder(config) -> bool:
    """True for models that attend both ways (BERT, RoBERTa) and for encoder-decoders."""
    if getattr(config, "is_encoder_decoder", False):
        return True
    site = sites().get(config.model_type)
    return site is not None and site.encoder


def check_causal(config, verb: str, needs: str = "next-token prediction",
                 fix: str = "use a decoder model such as llama or gpt2") -> None:
    """Refuse encoders and encoder-decoders where ``verb`` needs a causal (decoder-only) LM."""
    if is_encoder(config):
        raise NeuronAtlasError(
            f"{verb} needs {needs}, so a causal (decoder-only) language model; {config.model_type} is an "
            f"encoder (masked LM){' or encoder-decoder' if getattr(config, 'is_encoder_decoder', False) else ''}: "
            f"{fix}"
        )


def find_blocks(model: nn.Module, site: Site) -> nn.ModuleList:
    modules = dict(model.named_modules())
    for suffix in site.blocks:
        for name, module in modules.items():
            if isinstance(module, nn.ModuleList) and (name == suffix or name.endswith("." + suffix)):
                return module
    raise NeuronAtlasError(
        f"could not find the transformer blocks of this {site.model_types[0]} model "
        f"(looked for {', '.join(site.blocks)}); see {ADDING_A_FAMILY_DOC}"
    )


def _find_final_norm(model: nn.Module, site: Site) -> nn.Module | None:
    modules = dict(model.named_modules())
    for suffix in site.final_norm:
        for name, module in modules.items():
            if name == suffix or name.endswith("." + suffix):
                return module
    return None


def locate_neurons(model: nn.Module) -> ModelNeurons:
    """Bind the family's site to a loaded Hugging Face model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    site = site_for(str(model_type))
    layers = []
    for index, block in enumerate(find_blocks(model, site)):
        layers.append(
            LayerNeurons(
                index=index,
                site=site,
                down=block.get_submodule(site.down),
                act=block.get_submodule(site.act),
                up=block.get_submodule(site.up),
                gate=block.get_submodule(site.gate) if site.gate else None,
            )
        )
    return ModelNeurons(model, str(model_type), site, layers, _find_final_norm(model, site))


__all__ = ["LayerNeurons", "ModelNeurons", "Site", "check_causal", "find_blocks", "is_encoder", "locate_neurons", "site_for",
           "sites", "supported_model_types"]
