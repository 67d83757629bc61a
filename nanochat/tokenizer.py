"""
Byte-level BPE tokenizer in the style of GPT-4: trained with rustbpe, run with tiktoken.

    from nanochat.tokenizer import get_tokenizer, get_token_bytes
    tok = get_tokenizer()       # <base>/tokenizer/, written by `python -m scripts.tok_train`
    ids = tok.encode("hello", prepend="<|bos|>")
    ids, mask = tok.render_conversation({"messages": [...]})

Ids 0..255 are the raw bytes, then the learned merges, then the 9 special tokens in SPECIAL_TOKENS
order (so with the default 32,768 vocab, <|bos|> = 32,759). Plain text never encodes to a special
token; specials only enter through encode_special() and the prepend=/append= arguments.

Why rustbpe and tiktoken: against HF `tokenizers` they learn merges of the same quality in less time
and memory and encode several times faster (docs/perf.md, "Tokenizer"), and rustbpe hands over
tiktoken's mergeable ranks directly (byte tokens at ids 0..255, no GPT-2 byte<->unicode remap).
tests/test_tokenizer.py checks that the trainer and tiktoken split and encode text identically
(digit groups, mixed scripts, emoji).

On disk: tokenizer.json, data only (the split pattern, every mergeable token as base64 in rank
order, the special tokens), so loading a planted file can never run code, unlike the pickle
(tokenizer.pkl) older versions wrote; that one is read only with NANOCHAT_ALLOW_PICKLE_TOKENIZER=1,
which converts it to tokenizer.json once. Tokenizer.fingerprint() is the sha256 of that data:
checkpoints record it, and loading refuses another tokenizer.

Leaves out: HF-model tokenizers (from_pretrained only loads stock tiktoken encodings such as
"gpt2").
"""

import base64
import hashlib
import json
import os
import pickle

import tiktoken
import torch

from nanochat.common import get_base_dir, atomic_path, atomic_write_text

SPECIAL_TOKENS = ["<|bos|>",  # document delimiter, prepended to every document
                  "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>",  # the assistant calls the Python tool
                  "<|output_start|>", "<|output_end|>"]  # the tool's output, fed back to it

# GPT-4's cl100k pattern except digits group by 1-2 instead of 1-3: at d12 / 32K vocab val_bpb was
# {1,1} 0.969, {1,2} 0.965, {1,3} 0.972 (https://github.com/karpathy/nanochat dev/LOG.md, Jan 13).
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}"""
                 r"""| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")

TOKENIZER_FILE = "tokenizer.json"
PICKLE_TOKENIZER_FILE = "tokenizer.pkl"  # written by older versions; loaded only with this opt-in:
ALLOW_PICKLE_ENV = "NANOCHAT_ALLOW_PICKLE_TOKENIZER"
TOKENIZER_FORMAT = "nanochat-bpe"
TOKENIZER_FORMAT_VERSION = 1
TOKEN_BYTES_FILE = "token_bytes.pt"
TRAIN = "train the tokenizer with `python -m scripts.tok_train`"
RETRAIN = "delete it and re-run `python -m scripts.tok_train`"  # fixes a damaged tokenizer file
# The parts of an assistant message: (delimiters, whether the model is trained on them). Python
# outputs are written by the interpreter at test time, so they are not supervised.
PART_TOKENS = {"text": (None, None, 1), "python": ("<|python_start|>", "<|python_end|>", 1),
               "python_output": ("<|output_start|>", "<|output_end|>", 0)}

# -----------------------------------------------------------------------------

class Tokenizer:
    """A tiktoken Encoding plus nanochat's chat conventions (specials, render with loss mask)."""

    def __init__(self, enc, bos_token):
        self.enc = enc
        self.special_ids = {name: enc.encode_single_token(name) for name in enc.special_tokens_set}
        self.bos_token_id = self.encode_special(bos_token)

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        """Learn vocab_size - 256 - 9 merges from an iterator
        of strings; vocab_size counts the 9 specials."""
        num_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
        if num_merges < 0:
            raise ValueError(f"vocab_size={vocab_size} is too small: it needs at least 256 bytes + "
                             f"{len(SPECIAL_TOKENS)} special tokens = {256 + len(SPECIAL_TOKENS)}")
        try:  # imported here: loading and using a trained tokenizer needs only tiktoken
            import rustbpe
        except ImportError:
            raise ImportError("training a tokenizer needs the BPE trainer rustbpe: `pip install "
                              "rustbpe` (loading a trained one needs only tiktoken)") from None
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, 256 + num_merges, pattern=SPLIT_PATTERN)
        mergeable_ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        learned = len(mergeable_ranks) - 256
        if learned != num_merges:
            # rustbpe stops early when no pair occurs twice; a short vocab would shift the specials
            raise ValueError(f"the text only supports {learned} merges, vocab_size={vocab_size} "
                             f"needs {num_merges}: train on more text or lower the vocab size")
        special_tokens = {name: len(mergeable_ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name="rustbpe", pat_str=SPLIT_PATTERN,
                                mergeable_ranks=mergeable_ranks, special_tokens=special_tokens)
        return cls(enc, "<|bos|>")

    @classmethod
    def from_directory(cls, tokenizer_dir):
        path = os.path.join(tokenizer_dir, TOKENIZER_FILE)
        if os.path.exists(path):
            return cls(_encoding_from_data(_read_tokenizer_json(path), path), "<|bos|>")
        pickle_path = os.path.join(tokenizer_dir, PICKLE_TOKENIZER_FILE)
        if not os.path.exists(pickle_path):
            raise FileNotFoundError(f"no tokenizer at {path}: {TRAIN}")
        if os.environ.get(ALLOW_PICKLE_ENV) != "1":
            raise RuntimeError(f"{tokenizer_dir} has only {PICKLE_TOKENIZER_FILE} (older versions; "
                               f"unpickling runs any code it holds). If you made it, load it once "
                               f"with {ALLOW_PICKLE_ENV}=1 to convert it to {TOKENIZER_FILE}; "
                               f"otherwise {RETRAIN}")
        try:
            with open(pickle_path, "rb") as f:
                enc = pickle.load(f)  # opted in: the user vouches for this file
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, KeyError,
                TypeError, ValueError) as e:
            raise RuntimeError(f"{pickle_path} is corrupt ({type(e).__name__}: {e}); "
                               f"{RETRAIN}") from e
        if not isinstance(enc, tiktoken.Encoding):
            raise RuntimeError(f"{pickle_path} holds a {type(enc).__name__}, not a tiktoken "
                               f"Encoding; {RETRAIN}")
        tokenizer = cls(enc, "<|bos|>")
        atomic_write_text(path, json.dumps(tokenizer.to_data()))
        print(f"{ALLOW_PICKLE_ENV}=1: converted {pickle_path} to {path}; the .pkl is no longer "
              f"needed", flush=True)
        return tokenizer

    @classmethod
    def from_pretrained(cls, tiktoken_name):
        """A stock tiktoken encoding ("gpt2", "cl100k_base");
        downloads on first use. BOS is <|endoftext|>."""
        return cls(tiktoken.get_encoding(tiktoken_name), "<|endoftext|>")

    def save(self, tokenizer_dir):
        """Write tokenizer.json and token_bytes.pt, each through a temp file and a rename."""
        os.makedirs(tokenizer_dir, exist_ok=True)
        atomic_write_text(os.path.join(tokenizer_dir, TOKENIZER_FILE), json.dumps(self.to_data()))
        with atomic_path(os.path.join(tokenizer_dir, TOKEN_BYTES_FILE)) as tmp:
            torch.save(self.token_bytes(), tmp)

    def to_data(self):
        """The whole tokenizer as plain data: split pattern,
        mergeable tokens (base64, index = rank), specials."""
        ranks = self.enc._mergeable_ranks
        tokens = sorted(ranks, key=ranks.get)
        assert [ranks[t] for t in tokens] == list(range(len(tokens))), "ranks must be 0..n-1"
        return {"format": TOKENIZER_FORMAT, "version": TOKENIZER_FORMAT_VERSION,
                "pattern": self.enc._pat_str,
                "mergeable_ranks": [base64.b64encode(t).decode("ascii") for t in tokens],
                "special_tokens": dict(sorted(self.special_ids.items(), key=lambda kv: kv[1]))}

    def fingerprint(self):
        """sha256 of the tokenizer's data: two tokenizers with
        the same vocab size but other merges differ here."""
        return hashlib.sha256(json.dumps(self.to_data(), sort_keys=True).encode()).hexdigest()

    # -------------------------------------------------------------------------
    # vocabulary

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def get_special_tokens(self):
        return set(self.special_ids)

    def encode_special(self, text):
        if text not in self.special_ids:
            raise ValueError(f"{text!r} is not a special token of this tokenizer; known: "
                             f"{sorted(self.special_ids)}")
        return self.special_ids[text]

    def token_bytes(self):
        """int32 [vocab]: byte length of each token's raw
        bytes (not of its decoded string), 0 for specials."""
        special = set(self.special_ids.values())
        return torch.tensor([0 if i in special else len(self.enc.decode_single_token_bytes(i))
                             for i in range(self.enc.n_vocab)], dtype=torch.int32)

    # -------------------------------------------------------------------------
    # encode / decode

    def _special_id(self, token):
        """prepend=/append= accept a special token's name or any id."""
        if isinstance(token, int):
            if not 0 <= token < self.enc.n_vocab:
                raise ValueError(f"token id {token} is outside the vocab [0, {self.enc.n_vocab})")
            return token
        return self.encode_special(token)

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """str -> list[int]; list[str] -> list[list[int]]
        (threaded). Never emits specials from the text."""
        first = [] if prepend is None else [self._special_id(prepend)]
        last = [] if append is None else [self._special_id(append)]
        if isinstance(text, str):
            return first + self.enc.encode_ordinary(text) + last
        if isinstance(text, list):
            # tiktoken's threads release the GIL while encoding; specials go into its rows in place
            # (a new list per row measurably slows the batch call)
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            for row in rows:
                row[:0] = first
                row += last
            return rows
        raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")

    def decode(self, ids):
        return self.enc.decode(ids)

    # -------------------------------------------------------------------------
    # chat

    def render_conversation(self, conversation, max_tokens=2048):
        """
        Tokenize a chat into (ids, mask); mask 1 marks tokens the assistant is trained to produce:
        assistant text, python calls with their delimiters, and <|assistant_end|>. BOS, user turns,
        <|assistant_start|> and python outputs (the interpreter writes those at test time) get 0.
        A leading system message is merged into the first user message with "\\n\\n".
        max_tokens=None renders without truncation.
        """
        messages = conversation["messages"]
        offset = 0  # to name the caller's message index after the system merge
        if messages and messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("a system message must be followed by a user message")
            merged = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = [dict(messages[1], content=merged)] + list(messages[2:])
            offset = 1
        if not messages:
            raise ValueError("the conversation has no user or assistant messages")

        ids, mask = [], []
        def add(token_ids, supervised):
            ids.extend(token_ids)
            mask.extend([supervised] * len(token_ids))

        add([self.bos_token_id], 0)
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise ValueError(f"message {i + offset} has role {message['role']!r} where "
                                 f"{expected!r} was expected: roles must alternate user, "
                                 f"assistant, user, ... after an optional system message")
            content = message["content"]
            if expected == "user":
                if not isinstance(content, str):
                    raise ValueError(f"message {i + offset}: user content must be a string, "
                                     f"got {type(content).__name__}")
                add(self.encode(content, prepend="<|user_start|>", append="<|user_end|>"), 0)
                continue
            add([self.encode_special("<|assistant_start|>")], 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                if part["type"] not in PART_TOKENS:
                    raise ValueError(f"message {i + offset}: unknown part type {part['type']!r}; "
                                     f"use text, python or python_output")
                start, end, supervised = PART_TOKENS[part["type"]]
                add(self.encode(part["text"], prepend=start, append=end), supervised)
            add([self.encode_special("<|assistant_end|>")], 1)

        return ids[:max_tokens], mask[:max_tokens]  # [:None] keeps everything

    def render_for_completion(self, conversation):
        """
        Prompt ids for the assistant's next turn, the one rendering of the chat format that RL,
        eval, chat_cli and chat_web all use: drops a final assistant message, then appends
        <|assistant_start|>. A conversation ending with a user message is rendered as is. An
        assistant message may be the parts of a generated reply (engine.ReplyStream), so a
        calculator call goes back in as the call the model wrote. Not truncated: fitting the context
        is the caller's decision.
        """
        messages = conversation["messages"]
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, _ = self.render_conversation({"messages": messages}, max_tokens=None)
        return ids + [self.encode_special("<|assistant_start|>")]

# -----------------------------------------------------------------------------

def get_tokenizer():
    return Tokenizer.from_directory(os.path.join(get_base_dir(), "tokenizer"))

def _read_tokenizer_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RuntimeError(f"{path} is corrupt ({type(e).__name__}: {e}); {RETRAIN}") from None
    if not isinstance(data, dict) or data.get("format") != TOKENIZER_FORMAT:
        raise RuntimeError(f"{path} is not a {TOKENIZER_FORMAT} tokenizer file; {RETRAIN}")
    if data.get("version") != TOKENIZER_FORMAT_VERSION:
        raise RuntimeError(f"{path} has format version {data.get('version')!r}, this code reads "
                           f"version {TOKENIZER_FORMAT_VERSION}: {TRAIN} or use matching code")
    return data

def _encoding_from_data(data, path):
    """Rebuild the tiktoken Encoding from to_data()'s form,
    checking that ids are contiguous and distinct."""
    try:
        mergeable_ranks = {base64.b64decode(t, validate=True): rank
                           for rank, t in enumerate(data["mergeable_ranks"])}
        special_tokens = {str(name): int(i) for name, i in data["special_tokens"].items()}
        pattern = str(data["pattern"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise RuntimeError(f"{path} is corrupt ({type(e).__name__}: {e}); {RETRAIN}") from None
    n, last = len(mergeable_ranks), len(mergeable_ranks) + len(special_tokens) - 1
    distinct = n == len(data["mergeable_ranks"])
    if not distinct or sorted(special_tokens.values()) != list(range(n, last + 1)):
        raise RuntimeError(f"{path} is corrupt (duplicate tokens, or special ids not "
                           f"{n}..{last}); {RETRAIN}")
    return tiktoken.Encoding(name="rustbpe", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                             special_tokens=special_tokens)

def get_token_bytes(device="cpu"):
    path = os.path.join(get_base_dir(), "tokenizer", TOKEN_BYTES_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no token_bytes at {path}: {TRAIN}")
    try:
        token_bytes = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as e:
        first = (str(e).splitlines() or [""])[0]  # torch's messages can run on for lines
        raise RuntimeError(f"{path} is corrupt ({type(e).__name__}: {first}); {RETRAIN}") from None
    if not isinstance(token_bytes, torch.Tensor) or token_bytes.dim() != 1:
        raise RuntimeError(f"{path} does not hold a 1-D tensor of token byte lengths; {RETRAIN}")
    return token_bytes
