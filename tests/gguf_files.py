"""Write a Hugging Face Llama or Qwen2 folder as a GGUF file, as llama.cpp's converter lays it out.

The tests use it to load GGUF models without a download: the bundled tiny-llama and a tiny Qwen2
written as GGUF load back through transformers' GGUF support with the same logits and tokens.
Covered: the config keys transformers reads for these two architectures, a byte-level BPE
tokenizer (tokens, types, merges, special ids), the tensor names of ``gguf``'s own name map, and
the q/k row permutation the converter applies to Llama (transformers undoes it on load).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def _permute_llama(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k layout: each head's rotary halves interleaved, (out, in) -> (out, in)."""
    out = weight.shape[0]
    return weight.reshape(heads, 2, out // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tokenizer_metadata(writer, folder: Path) -> None:
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    if spec["model"]["type"] != "BPE":
        raise ValueError("only byte-level BPE tokenizers are written here")
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = {added["id"] for added in spec.get("added_tokens", []) if added.get("special")}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if index in special else 1 for index in range(len(tokens))])  # 3: control
    writer.add_token_merges([" ".join(pair) if isinstance(pair, list) else pair for pair in spec["model"]["merges"]])
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    named = {key: value.get("content") if isinstance(value, dict) else value for key, value in config.items()
             if key in ("bos_token", "eos_token", "pad_token", "unk_token")}
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("pad_token", writer.add_pad_token_id), ("unk_token", writer.add_unk_token_id)):
        if named.get(key) in vocab:
            add(vocab[named[key]])
    processor = json.dumps(spec.get("post_processor") or {})
    bos = named.get("bos_token")  # the converter's add_bos_token: the post-processor puts it in
    writer.add_add_bos_token(bos is not None and json.dumps(bos) in processor)


def write_gguf(folder: Path, path: Path, quantisation: str = "F32") -> Path:
    """``folder`` (a llama or qwen2 model with a tokenizer.json) as GGUF at ``path``; F32, F16 or Q8_0."""
    import gguf
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    arch = config["model_type"]
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(folder.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_freq_base(float(config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))))
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_vocab_size(config["vocab_size"])
    _tokenizer_metadata(writer, folder)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], layers)
    kind = gguf.GGMLQuantizationType[quantisation]
    for name, tensor in load_file(str(folder / "model.safetensors")).items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ValueError(f"no GGUF name for {name}")
        data = tensor.to(torch.float32).numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            data = _permute_llama(data, heads if "q_proj" in name else kv_heads)
        if data.ndim == 2 and kind != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(target, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:  # norms and biases stay float32, as the converter keeps them
            writer.add_tensor(target, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
