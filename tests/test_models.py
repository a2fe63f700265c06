"""Every family adapter finds the right neurons: z, g and W_in/W_gate/W_out agree with the weights.

Each family is a tiny random model with odd sizes (d_model 24, d_ff 37, 2 layers, vocab 101). The
test names its blocks and the module whose input is the MLP input x itself, independently of the
adapter, so a wrong module, a swapped gate/up or a transposed weight fails.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import transformers as tf
from transformers.activations import ACT2FN

from neuronatlas.errors import NeuronAtlasError
from neuronatlas.hooks import capture
from neuronatlas.models import locate_neurons, supported_model_types

D, FF, LAYERS, VOCAB = 24, 37, 2, 101
DECODER = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # within the tiny vocabulary
ENCODER = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
               num_attention_heads=4, max_position_embeddings=66, hidden_act="gelu")


@dataclass(frozen=True)
class Family:
    model_class: str
    config: object  # () -> PretrainedConfig
    blocks: str  # path of the block list, from the model
    mlp_in: str  # module (relative to one block) whose first input is the MLP input x
    act_key: str  # config attribute naming the activation, or "=name" for a family's fixed ACT2FN[name]
    gated: bool
    final_norm: str | None
    ff: int = 37  # neurons per layer (BLOOM and MPT fix it at 4 x d_model)


def _gemma3_multimodal():
    text = dict(DECODER, head_dim=8, sliding_window=4, model_type="gemma3_text")
    # a deeper, narrower vision tower: picking its blocks would fail the count and width checks
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=29,
                  num_hidden_layers=3, num_attention_heads=2, image_size=28, patch_size=14)
    return tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=1,
                           boi_token_index=98, eoi_token_index=99, image_token_index=100)


FAMILIES = {
    "llama": Family("LlamaForCausalLM", lambda: tf.LlamaConfig(**DECODER), "model.layers", "mlp",
                    "hidden_act", True, "model.norm"),
    "mistral": Family("MistralForCausalLM", lambda: tf.MistralConfig(**DECODER), "model.layers", "mlp",
                      "hidden_act", True, "model.norm"),
    "qwen2": Family("Qwen2ForCausalLM", lambda: tf.Qwen2Config(**DECODER), "model.layers", "mlp",
                    "hidden_act", True, "model.norm"),
    "qwen3": Family("Qwen3ForCausalLM", lambda: tf.Qwen3Config(**DECODER, head_dim=8), "model.layers",
                    "mlp", "hidden_act", True, "model.norm"),
    "gemma": Family("GemmaForCausalLM", lambda: tf.GemmaConfig(**DECODER, head_dim=8), "model.layers",
                    "mlp", "hidden_act", True, "model.norm"),
    "gemma2": Family("Gemma2ForCausalLM", lambda: tf.Gemma2Config(**DECODER, head_dim=8, sliding_window=4),
                     "model.layers", "mlp", "hidden_activation", True, "model.norm"),
    "gemma3_text": Family("Gemma3ForCausalLM",
                          lambda: tf.Gemma3TextConfig(**DECODER, head_dim=8, sliding_window=4),
                          "model.layers", "mlp", "hidden_activation", True, "model.norm"),
    "gemma3": Family("Gemma3ForConditionalGeneration", _gemma3_multimodal, "model.language_model.layers",
                     "mlp", "hidden_activation", True, "model.language_model.norm"),
    "phi3": Family("Phi3ForCausalLM", lambda: tf.Phi3Config(**DECODER, pad_token_id=0), "model.layers",
                   "mlp", "hidden_act", True, "model.norm"),
    "gpt2": Family("GPT2LMHeadModel",
                   lambda: tf.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=D, n_layer=LAYERS,
                                         n_head=4, n_inner=FF, activation_function="gelu_new"),
                   "transformer.h", "mlp", "activation_function", False, "transformer.ln_f"),
    "gpt_neox": Family("GPTNeoXForCausalLM",
                       lambda: tf.GPTNeoXConfig(**{k: v for k, v in DECODER.items() if k != "num_key_value_heads"},
                                                hidden_act="gelu"),
                       "gpt_neox.layers", "mlp", "hidden_act", False, "gpt_neox.final_layer_norm"),
    "opt": Family("OPTForCausalLM",
                  lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=D, ffn_dim=FF, num_hidden_layers=LAYERS,
                                       num_attention_heads=4, word_embed_proj_dim=D, max_position_embeddings=64,
                                       activation_function="relu"),
                  "model.decoder.layers", "fc1", "activation_function", False, "model.decoder.final_layer_norm"),
    # the families that copy Llama's MLP, blocks and final norm
    **{name: Family(model_class, lambda config=config: getattr(tf, config)(**DECODER, **IDS, head_dim=6),
                    "model.layers", "mlp", "hidden_act", True, "model.norm")
       for name, model_class, config in (
           ("smollm3", "SmolLM3ForCausalLM", "SmolLM3Config"), ("olmo", "OlmoForCausalLM", "OlmoConfig"),
           ("olmo2", "Olmo2ForCausalLM", "Olmo2Config"), ("olmo3", "Olmo3ForCausalLM", "Olmo3Config"),
           ("stablelm", "StableLmForCausalLM", "StableLmConfig"), ("granite", "GraniteForCausalLM", "GraniteConfig"),
           ("cohere", "CohereForCausalLM", "CohereConfig"), ("cohere2", "Cohere2ForCausalLM", "Cohere2Config"),
           ("helium", "HeliumForCausalLM", "HeliumConfig"), ("exaone4", "Exaone4ForCausalLM", "Exaone4Config"),
           ("seed_oss", "SeedOssForCausalLM", "SeedOssConfig"), ("ministral", "MinistralForCausalLM", "MinistralConfig"))},
    "glm": Family("GlmForCausalLM", lambda: tf.GlmConfig(**DECODER, **IDS, head_dim=8), "model.layers", "mlp",
                  "hidden_act", True, "model.norm"),
    "glm4": Family("Glm4ForCausalLM", lambda: tf.Glm4Config(**DECODER, **IDS, head_dim=8), "model.layers", "mlp",
                   "hidden_act", True, "model.norm"),
    # Phi and Persimmon rotate half of each head: 2 heads of 12 (4 heads of 6 would rotate an odd 3)
    "phi": Family("PhiForCausalLM",
                  lambda: tf.PhiConfig(**dict(DECODER, num_attention_heads=2, num_key_value_heads=2), **IDS),
                  "model.layers", "mlp", "hidden_act", False, "model.final_layernorm"),
    "nemotron": Family("NemotronForCausalLM", lambda: tf.NemotronConfig(**DECODER, **IDS), "model.layers", "mlp",
                       "hidden_act", False, "model.norm"),
    "arcee": Family("ArceeForCausalLM", lambda: tf.ArceeConfig(**DECODER, **IDS), "model.layers", "mlp", "hidden_act",
                    False, "model.norm"),
    "falcon": Family("FalconForCausalLM",
                     lambda: tf.FalconConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=4,
                                             ffn_hidden_size=FF, max_position_embeddings=64, activation="gelu", **IDS),
                     "transformer.h", "mlp", "activation", False, "transformer.ln_f"),
    "persimmon": Family("PersimmonForCausalLM",
                        lambda: tf.PersimmonConfig(**{k: v for k, v in DECODER.items() if k != "num_key_value_heads"} | {"num_attention_heads": 2},
                                                   hidden_act="relu2", **IDS),
                        "model.layers", "mlp", "hidden_act", False, "model.final_layernorm"),
    "bloom": Family("BloomForCausalLM",
                    lambda: tf.BloomConfig(vocab_size=VOCAB, hidden_size=D, n_layer=LAYERS, n_head=4, **IDS),
                    "transformer.h", "mlp", "=gelu_new", False, "transformer.ln_f", ff=4 * D),
    "gptj": Family("GPTJForCausalLM",
                   lambda: tf.GPTJConfig(vocab_size=VOCAB, n_positions=64, n_embd=D, n_layer=LAYERS, n_head=4, rotary_dim=4,
                                         n_inner=FF, activation_function="gelu_new", **IDS),
                   "transformer.h", "mlp", "activation_function", False, "transformer.ln_f"),
    "codegen": Family("CodeGenForCausalLM",
                      lambda: tf.CodeGenConfig(vocab_size=VOCAB, n_positions=64, n_ctx=64, n_embd=D, n_layer=LAYERS, n_head=4,
                                               rotary_dim=4, n_inner=FF, activation_function="gelu_new",
                                               bos_token_id=1, eos_token_id=2),
                      "transformer.h", "mlp", "activation_function", False, "transformer.ln_f"),
    "gpt_bigcode": Family("GPTBigCodeForCausalLM",
                          lambda: tf.GPTBigCodeConfig(vocab_size=VOCAB, n_positions=64, n_embd=D, n_layer=LAYERS, n_head=4,
                                                      n_inner=FF, activation_function="gelu_pytorch_tanh", **IDS),
                          "transformer.h", "mlp", "activation_function", False, "transformer.ln_f"),
    "starcoder2": Family("Starcoder2ForCausalLM",
                         lambda: tf.Starcoder2Config(**DECODER, hidden_act="gelu_pytorch_tanh", **IDS), "model.layers",
                         "mlp", "hidden_act", False, "model.norm"),
    "mpt": Family("MptForCausalLM", lambda: tf.MptConfig(d_model=D, n_heads=4, n_layers=LAYERS, vocab_size=VOCAB,
                                                         max_seq_len=64, **IDS),
                  "transformer.blocks", "ffn", "=gelu", False, "transformer.norm_f", ff=4 * D),
    "xglm": Family("XGLMForCausalLM",
                   lambda: tf.XGLMConfig(vocab_size=VOCAB, d_model=D, ffn_dim=FF, num_layers=LAYERS, attention_heads=4,
                                         max_position_embeddings=64, activation_function="gelu", **IDS),
                   "model.layers", "fc1", "activation_function", False, "model.layer_norm"),
    "biogpt": Family("BioGptForCausalLM",
                     lambda: tf.BioGptConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=4,
                                             intermediate_size=FF, hidden_act="gelu", max_position_embeddings=64, **IDS),
                     "biogpt.layers", "fc1", "hidden_act", False, "biogpt.layer_norm"),
    "bert": Family("BertForMaskedLM", lambda: tf.BertConfig(**ENCODER), "bert.encoder.layer", "intermediate",
                   "hidden_act", False, None),
    "roberta": Family("RobertaForMaskedLM", lambda: tf.RobertaConfig(**ENCODER), "roberta.encoder.layer",
                      "intermediate", "hidden_act", False, None),
    **{name: Family(model_class, lambda config=config: getattr(tf, config)(**ENCODER), blocks, mlp_in, "hidden_act", False,
                    None)
       for name, model_class, config, blocks, mlp_in in (
           ("xlm-roberta", "XLMRobertaForMaskedLM", "XLMRobertaConfig", "roberta.encoder.layer", "intermediate"),
           ("xlm-roberta-xl", "XLMRobertaXLForMaskedLM", "XLMRobertaXLConfig", "roberta.encoder.layer", "intermediate"),
           ("camembert", "CamembertForMaskedLM", "CamembertConfig", "roberta.encoder.layer", "intermediate"),
           ("roberta-prelayernorm", "RobertaPreLayerNormForMaskedLM", "RobertaPreLayerNormConfig",
            "roberta_prelayernorm.encoder.layer", "intermediate.dense"),  # its intermediate starts with a LayerNorm
           ("ernie", "ErnieForMaskedLM", "ErnieConfig", "ernie.encoder.layer", "intermediate"),
           ("megatron-bert", "MegatronBertForMaskedLM", "MegatronBertConfig", "bert.encoder.layer", "intermediate"),
           ("mpnet", "MPNetForMaskedLM", "MPNetConfig", "mpnet.encoder.layer", "intermediate"),
           ("deberta-v2", "DebertaV2ForMaskedLM", "DebertaV2Config", "deberta.encoder.layer", "intermediate"))},
    "electra": Family("ElectraForMaskedLM", lambda: tf.ElectraConfig(**ENCODER, embedding_size=D), "electra.encoder.layer",
                      "intermediate", "hidden_act", False, None),
    "distilbert": Family("DistilBertForMaskedLM",
                         lambda: tf.DistilBertConfig(vocab_size=VOCAB, max_position_embeddings=66, n_layers=LAYERS, n_heads=4,
                                                     dim=D, hidden_dim=FF, activation="gelu"),
                         "distilbert.transformer.layer", "ffn", "activation", False, None),
    "modernbert": Family("ModernBertForMaskedLM",
                         lambda: tf.ModernBertConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=FF,
                                                     num_hidden_layers=LAYERS, num_attention_heads=4,
                                                     hidden_activation="gelu", max_position_embeddings=64, **IDS,
                                                     cls_token_id=3, sep_token_id=4),
                         "model.layers", "mlp", "hidden_activation", True, "model.final_norm"),
}


@functools.cache
def tiny(name: str):
    """(model, inputs) for a family: seeded, eval mode, a padded batch of 2 x 7 tokens."""
    torch.manual_seed(0)
    family = FAMILIES[name]
    model = getattr(tf, family.model_class)(family.config()).eval()
    input_ids = torch.randint(3, VOCAB - 3, (2, 7))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    return model, dict(input_ids=input_ids, attention_mask=attention_mask)


def text_config(model):
    return getattr(model.config, "text_config", model.config)


def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def linear(x, weight, bias):
    y = x @ weight.T
    return y if bias is None else y + bias


def in_biases(layer):
    """(gate bias, up bias) as the MLP applies them, splitting a fused gate_up bias gate-first."""
    up_bias = getattr(layer.up, "bias", None)
    if layer.site.fused_gate_up:
        return (None, None) if up_bias is None else up_bias.chunk(2)
    return (getattr(layer.gate, "bias", None) if layer.gate is not None else None), up_bias


def test_every_supported_type_is_tested():
    assert sorted(FAMILIES) == supported_model_types()


@pytest.mark.parametrize("name", FAMILIES)
def test_widths_and_layers_match_config(name):
    model, _ = tiny(name)
    neurons = locate_neurons(model)
    config = text_config(model)
    family = FAMILIES[name]
    assert neurons.model_type == model.config.model_type == name
    assert neurons.num_layers == config.num_hidden_layers == LAYERS
    assert neurons.widths == [family.ff] * LAYERS
    assert neurons.gated is family.gated
    assert (neurons.layers[0].w_gate() is not None) is family.gated
    blocks = model.get_submodule(family.blocks)
    for index, layer in enumerate(neurons.layers):
        assert layer.index == index
        assert any(m is layer.down for m in blocks[index].modules())
        assert layer.w_out().shape == (D, family.ff)
        assert layer.w_in().shape == (family.ff, D)
    # one activation module per layer: a shared one would fire every layer's gate hook
    assert len({id(layer.act) for layer in neurons.layers}) == LAYERS
    expected_norm = model.get_submodule(family.final_norm) if family.final_norm else None
    assert neurons.final_norm is expected_norm


@pytest.mark.parametrize("name", FAMILIES)
def test_activations_match_weights(name):
    model, inputs = tiny(name)
    family = FAMILIES[name]
    fixed = family.act_key.startswith("=")
    act = ACT2FN[family.act_key[1:] if fixed else getattr(text_config(model), family.act_key)]
    neurons = locate_neurons(model)
    blocks = model.get_submodule(family.blocks)
    xs, outs, zs, gs = {}, {}, {}, {}

    def keep(store, index, value):
        assert index not in store, f"layer {index} reported twice"
        store[index] = value.detach().clone()

    handles = []
    for index, layer in enumerate(neurons.layers):
        handles.append(blocks[index].get_submodule(family.mlp_in).register_forward_pre_hook(
            lambda m, args, kwargs, i=index: keep(xs, i, args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True))
        handles.append(layer.down.register_forward_hook(lambda m, a, out, i=index: keep(outs, i, out)))
    try:
        with torch.no_grad(), capture(neurons, lambda i, z: keep(zs, i, z), lambda i, g: keep(gs, i, g)):
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()

    assert sorted(zs) == sorted(xs) == list(range(LAYERS))
    assert sorted(gs) == (list(range(LAYERS)) if family.gated else [])
    with torch.no_grad():
        for index, layer in enumerate(neurons.layers):
            x, z = xs[index], zs[index]
            assert z.shape == (*x.shape[:-1], family.ff)
            assert z.dim() == (2 if name == "opt" else 3)  # OPT's MLP runs on (B*T, d) tokens
            gate_bias, up_bias = in_biases(layer)
            up = linear(x, layer.w_in(), up_bias)
            if family.gated:
                pre = linear(x, layer.w_gate(), gate_bias)
                g = act(pre)
                torch.testing.assert_close(gs[index], g)
                torch.testing.assert_close(z, g * up)
            else:
                pre = up
                torch.testing.assert_close(z, act(up))
            torch.testing.assert_close(layer.act(pre), act(pre))  # the located act module is the activation
            torch.testing.assert_close(outs[index], linear(z, layer.w_out(), getattr(layer.down, "bias", None)))


@pytest.mark.parametrize("name", FAMILIES)
def test_capture_is_read_only_and_unhooks(name):
    model, inputs = tiny(name)
    neurons = locate_neurons(model)
    before = hook_count(model)
    with torch.no_grad():
        plain = model(**inputs).logits
        seen = []
        with capture(neurons, lambda i, z: seen.append(z.sum()), lambda i, g: seen.append(g.sum())):
            assert hook_count(model) > before
            hooked = model(**inputs).logits
    assert seen and not torch.isnan(plain).any()
    assert torch.equal(plain, hooked)
    assert hook_count(model) == before

    with pytest.raises(RuntimeError, match="boom"):
        with capture(neurons, lambda i, z: None, lambda i, g: None):
            raise RuntimeError("boom")
    assert hook_count(model) == before


def test_unsupported_family_names_supported_ones():
    config = tf.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=37, num_layers=1, num_heads=2)
    model = tf.T5ForConditionalGeneration(config)
    with pytest.raises(NeuronAtlasError) as info:
        locate_neurons(model)
    message = str(info.value)
    assert "'t5'" in message and "docs/adding-a-family.md" in message
    for model_type in FAMILIES:
        assert model_type in message
