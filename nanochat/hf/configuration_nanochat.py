"""
Hugging Face config of a nanochat model, written next to its weights by `python -m
scripts.export_hf`. The fields are nanochat's own GPTConfig (sequence_len, n_layer, n_head,
n_kv_head, n_embd, window_pattern, vocab_size) plus the vocab rounded up for the embedding tables;
transformers' standard names are aliases.
"""

from transformers import PretrainedConfig


class NanoChatConfig(PretrainedConfig):
    model_type = "nanochat_gpt"
    # generate() and DynamicCache read the standard names; no `sliding_window` field on purpose:
    # transformers would then trim the cache itself, while this model applies its per-layer windows
    # in the attention mask
    attribute_map = {"num_hidden_layers": "n_layer", "hidden_size": "n_embd",
                     "num_attention_heads": "n_head", "num_key_value_heads": "n_kv_head",
                     "max_position_embeddings": "sequence_len"}

    def __init__(self, sequence_len=2048, vocab_size=32768, padded_vocab_size=None, n_layer=12,
                 n_head=6, n_kv_head=6, n_embd=768, window_pattern="SSSL", use_cache=True,
                 **kwargs):
        self.sequence_len, self.vocab_size = sequence_len, vocab_size
        rounded = -(-vocab_size // 64) * 64
        self.padded_vocab_size = padded_vocab_size if padded_vocab_size is not None else rounded
        self.n_layer, self.n_head, self.n_kv_head, self.n_embd = n_layer, n_head, n_kv_head, n_embd
        self.window_pattern, self.use_cache = window_pattern, use_cache
        super().__init__(**{**kwargs, "tie_word_embeddings": False})  # lm_head, wte: two matrices
