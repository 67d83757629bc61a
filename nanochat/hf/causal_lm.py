"""
Any Hugging Face causal LM behind the two small interfaces nanochat's evaluations call, so base_eval
can put, say, GPT-2's CORE and bpb next to a nanochat model's:

    model, tokenizer = load_hf_model("openai-community/gpt2", device)  # a hub name or local dir
    evaluate_core(model, tokenizer, device)

model(idx) -> logits (B, T, vocab); model(idx, targets, loss_reduction="none") -> nats per token
(targets -1 ignored); model.max_seq_len = the config's max_position_embeddings, so core_eval crops
prompts on the left to fit (GPT-2: 1024). tokenizer.encode(texts, prepend=bos_id) never adds the
model's own special tokens and never reads special tokens out of the text (as nanochat's tokenizer);
BOS is the tokenizer's bos token, else its eos (GPT-2's <|endoftext|>). Leaves out: generation
(samples), encoder-decoder models.
"""

import os

import torch
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPE
from nanochat.hf.export import bytes_to_unicode


class HFCausalLM:
    """Logits (and per-token losses) of a transformers
    causal LM, computed under the run's compute dtype."""
    def __init__(self, model, device):
        self.model, self.device = model, torch.device(device)
        self.max_seq_len = getattr(model.config, "max_position_embeddings", None)

    @torch.no_grad()
    def __call__(self, idx, targets=None, loss_reduction="none"):
        # fp32 weights with bf16 matmuls (autocast) on a GPU, as karpathy/nanochat ran GPT-2 for its
        # CORE figures; right padding needs no mask: attention is causal
        autocast = COMPUTE_DTYPE != torch.float32
        with torch.autocast(self.device.type, dtype=COMPUTE_DTYPE, enabled=autocast):
            logits = self.model(input_ids=idx).logits
        if targets is None:
            return logits
        assert loss_reduction == "none", f"loss_reduction={loss_reduction!r}: only 'none' is here"
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1,
                               reduction="none")


class HFTokenizer:
    """The encode/BOS/token_bytes part of nanochat's Tokenizer
    that CORE and bpb use, over a transformers tokenizer."""
    def __init__(self, tokenizer, name):
        self.tokenizer = tokenizer
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.bos_token_id = bos if bos is not None else eos
        if self.bos_token_id is None:
            raise ValueError(f"the tokenizer of {name} has neither a bos nor an eos token to start "
                             f"documents with: set one in its tokenizer_config.json (bos_token)")

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=None):
        """str -> list[int]; list[str] -> list[list[int]]; prepend: a token id put first.
        num_threads is what the pretraining loader passes; the Rust tokenizer batches on its own
        threads."""
        rows = self.tokenizer([text] if isinstance(text, str) else text, add_special_tokens=False,
                              split_special_tokens=True)["input_ids"]
        rows = [([] if prepend is None else [prepend]) + row for row in rows]
        return rows[0] if isinstance(text, str) else rows

    def token_bytes(self):
        """int32 [vocab]: the bytes each token stands for, 0 for special tokens (bpb's denominator).
        Exact for byte-level BPE (GPT-2 style), whose token strings spell raw bytes; other
        tokenizers raise."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if type(getattr(backend, "decoder", None)).__name__ != "ByteLevel":
            raise ValueError("bits per byte needs a byte-level BPE tokenizer (GPT-2 style) to "
                             "count the bytes of each token; evaluate this model with --eval=core")
        alphabet = set(bytes_to_unicode().values())  # one character per byte
        added = self.tokenizer.added_tokens_decoder  # {id: AddedToken}: their content is plain text

        def num_bytes(i, token):
            if i in added:
                return 0 if added[i].special else len(added[i].content.encode("utf-8"))
            assert set(token) <= alphabet, f"token {i} ({token!r}) is not in the byte alphabet"
            return len(token)
        tokens = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        return torch.tensor([num_bytes(i, t) for i, t in enumerate(tokens)], dtype=torch.int32)


def load_hf_model(name_or_dir, device):
    """(model, tokenizer) for evaluation. A local directory may run its own modeling code
    (trust_remote_code, e.g. a nanochat export); a hub name never does: download it first (`hf
    download NAME --local-dir DIR`) to allow that."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer  # only this path needs it
    except ImportError as e:
        raise ImportError(f"a Hugging Face model needs transformers ({e}): "
                          f"pip install \"nanochat[hf]\"") from e
    local = os.path.isdir(name_or_dir)
    model = AutoModelForCausalLM.from_pretrained(name_or_dir, dtype=torch.float32,
                                                 trust_remote_code=local)
    tokenizer = AutoTokenizer.from_pretrained(name_or_dir, trust_remote_code=local)
    return HFCausalLM(model.to(device).eval(), device), HFTokenizer(tokenizer, name_or_dir)
