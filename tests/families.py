"""Tiny randomly initialised models of every architecture family qcompile covers (no download).

Each family is a transformers config class, a model class and what differs from the shared tiny shape
(2 layers, hidden 64, 4 heads, 2 KV heads, vocab 256). `tiny_model(family)` builds one with random norm
gains (so that folding or ignoring a gain would show); `write_folder(family, folder)` saves it as a Hugging
Face folder with a byte-level tokenizer, which is what a user hands to `qcompile model`. The tests and
`benchmarks/bench_architectures.py` share this table.
"""

from __future__ import annotations

import pathlib

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)

_LONGROPE = dict(rope_type="longrope", short_factor=[1.0] * 8, long_factor=[1.5] * 8,
                 original_max_position_embeddings=128)

# family → (config class, model class, config overrides)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama3.1": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=128))),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(original_max_position_embeddings=1024)),
    "phi3-longrope": ("Phi3Config", "Phi3ForCausalLM", dict(rope_parameters=dict(rope_theta=10000.0, **_LONGROPE),
                                                            original_max_position_embeddings=128)),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, sliding_window=8)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, sliding_window=8)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(embedding_multiplier=2.0, residual_multiplier=0.5,
                                                          attention_multiplier=0.25, logits_scaling=4.0)),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(no_rope_layers=[1, 0])),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024, n_inner=128)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(num_kv_heads=1)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2,
                                                              moe_intermediate_size=32, shared_expert_intermediate_size=64)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                              moe_intermediate_size=32)),
}


def tiny_model(family: str, **config):
    """A tiny random `family` model in eval mode, norm gains uniform in [0.5, 1.5] (seeded); `config` overrides
    the family's settings (`num_hidden_layers=...`)."""
    import torch
    import transformers

    config_name, model_name, overrides = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**TINY, **overrides, **config})
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name.split(".")[-2]:
                p.uniform_(0.5, 1.5)
    return model


def write_byte_tokenizer(folder: pathlib.Path) -> None:
    """A byte-level tokenizer.json with one token per byte (ids 0..255: within the tiny models' vocabulary),
    so that tiny models calibrate and evaluate on real text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(folder / "tokenizer.json"))
    # loaded as it is: without this, transformers picks the family's tokenizer class (GPT-2's, Gemma's), which
    # adds special tokens the byte vocabulary does not have
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')


def write_folder(family: str, folder: pathlib.Path):
    """Save a tiny `family` model with a byte-level tokenizer into `folder` (a HF model folder); returns
    the model."""
    model = tiny_model(family)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    write_byte_tokenizer(folder)
    return model
