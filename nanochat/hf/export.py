"""
Convert a nanochat checkpoint to a Hugging Face model directory, and load such a directory back.

    from nanochat.hf.export import export_model, load_export
    export_model(state, meta, tokenizer, "out/")        # what scripts/export_hf.py does
    model, tokenizer, meta = load_export("out/", "cpu")   # what load_model(DIR, ...) does

A directory holds model.safetensors (the state dict under nanochat's own parameter names),
config.json (+ configuration_nanochat.py, modeling_nanochat.py via auto_map), generation_config.json
(stops at <|assistant_end|> or <|bos|>, as Engine does), tokenizer.json + tokenizer_config.json,
chat_template.jinja, nanochat_meta.json (the checkpoint's meta) and README.md (the model card).

Tokenizer: tiktoken ranks become an HF byte-level BPE: vocab = each token's bytes in GPT-2's
byte->unicode alphabet, id = rank; merges = every split of a token into two vocab tokens, ordered by
the merged token's rank (tiktoken merges the adjacent pair whose concatenation has the lowest rank);
ignore_merges because tiktoken looks a whole pre-token piece up before merging. Loading inverts the
same map, so the fingerprint of the tokenizer read back equals the one the checkpoint recorded.
Measured: a tokenizer of vocab 8,192 trained on 4.1M chars (150 CPython stdlib files + CJK/emoji
text) encodes 868 samples (430K tokens, 50 of them files it never saw) to the same ids under HF
tokenizers as under tiktoken, 0 mismatches.

Needs `safetensors` to load and also `tokenizers` to export (pip install "nanochat[hf]");
transformers only to run the exported model under transformers.
"""

import base64
import json
import os

import torch

from nanochat.common import atomic_path, atomic_write_text, read_json
from nanochat.tokenizer import Tokenizer, _encoding_from_data

MODEL_TYPE = "nanochat_gpt"
TEMPLATE_DIR = os.path.dirname(os.path.abspath(__file__))
REMOTE_CODE = ["configuration_nanochat.py", "modeling_nanochat.py"]
META_FILE = "nanochat_meta.json"
WEIGHTS_FILE = "model.safetensors"
GPT_FIELDS = ["sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd",
              "window_pattern"]

# nanochat's chat format (Tokenizer.render_conversation): <|bos|>, a leading system message merged
# into the first user message with "\n\n", user turns in <|user_start|>..<|user_end|>, assistant
# turns in <|assistant_start|>..<|assistant_end|> whose content is a string or a list of parts
# (text, python, python_output).
CHAT_TEMPLATE = """{{- '<|bos|>' -}}{%- set ns = namespace(system='') -%}
{%- for message in messages -%}{%- if loop.first and message['role'] == 'system' -%}
{%- set ns.system = message['content'] + '\\n\\n' -%}
{%- elif message['role'] == 'user' -%}
{{- '<|user_start|>' + ns.system + message['content'] + '<|user_end|>' -}}{%- set ns.system = '' -%}
{%- elif message['role'] == 'assistant' -%}{{- '<|assistant_start|>' -}}
{%- if message['content'] is string -%}{{- message['content'] -}}
{%- else -%}{%- for part in message['content'] -%}
{%- if part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}
{%- elif part['type'] == 'python_output' -%}
{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}
{%- else -%}{{- part['text'] -}}{%- endif -%}{%- endfor -%}{%- endif -%}{{- '<|assistant_end|>' -}}
{%- else -%}{{- raise_exception('roles must be user/assistant, after an optional first system '
                                + 'message; got ' + message['role']) -}}{%- endif -%}{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}
"""

# -----------------------------------------------------------------------------
# Tokenizer

def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to
    printable unicode characters (HF ByteLevel's alphabet)."""
    # kept as themselves: "!".."~", "¡".."¬", "®".."ÿ"
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    others = [b for b in range(256) if b not in printable]  # shifted past 255, in byte order
    return {b: chr(b) if b in printable else chr(256 + others.index(b)) for b in range(256)}

def hf_tokenizer_json(tokenizer):
    """Our tokenizer (its public to_data(): pattern, tokens in
    rank order, specials) as an HF tokenizer.json string."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    data = tokenizer.to_data()
    byte_char = bytes_to_unicode()
    to_str = lambda b: "".join(byte_char[x] for x in b)
    tokens = [base64.b64decode(t) for t in data["mergeable_ranks"]]
    ranks = {t: i for i, t in enumerate(tokens)}
    merges = sorted((rank, ranks[token[:i]], ranks[token[i:]]) for rank, token in enumerate(tokens)
                    for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks)
    merges = [(to_str(tokens[left]), to_str(tokens[right])) for _, left, right in merges]
    vocab = {to_str(t): i for i, t in enumerate(tokens)}
    hf = Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(data["pattern"]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    specials = sorted(data["special_tokens"].items(), key=lambda kv: kv[1])
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s, _ in specials])
    for name, i in specials:
        assert hf.token_to_id(name) == i, f"special {name} got id {hf.token_to_id(name)}, not {i}"
    return hf.to_str()

def tokenizer_from_hf_json(path):
    """Our Tokenizer from an exported tokenizer.json (the inverse of hf_tokenizer_json)."""
    hf = read_json(path)
    char_byte = {c: b for b, c in bytes_to_unicode().items()}
    try:
        vocab = hf["model"]["vocab"]
        tokens = sorted(vocab, key=vocab.get)
        assert [vocab[t] for t in tokens] == list(range(len(tokens)))
        # to_data()'s form, the fields _encoding_from_data reads
        data = {"pattern": hf["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"],
                "mergeable_ranks": [base64.b64encode(bytes(char_byte[c] for c in t)).decode("ascii")
                                    for t in tokens],
                "special_tokens": {t["content"]: t["id"] for t in hf["added_tokens"]}}
    except (KeyError, IndexError, TypeError, AssertionError) as e:
        raise ValueError(f"{path} is not a tokenizer.json written by scripts.export_hf "
                         f"({type(e).__name__}: {e}); re-export the model") from None
    return Tokenizer(_encoding_from_data(data, path), "<|bos|>")

# -----------------------------------------------------------------------------
# Model card

def model_card(meta, source, report_text=None):
    """README.md for the Hub: YAML header, size, data, training tokens, evals, how to load."""
    cfg = meta["model_config"]
    uc = meta.get("pretrain_config") or meta.get("user_config") or {}
    total = (meta.get("param_counts") or {}).get("total")
    tokens = (meta.get("total_batch_size") or 0) * (meta.get("num_iterations") or 0)
    bpb = meta.get("val_bpb")
    rows = [("stage", f"{source} (step {meta.get('step')})"),
            ("layers / width / heads (kv)",
             f"{cfg['n_layer']} / {cfg['n_embd']} / {cfg['n_head']} ({cfg['n_kv_head']})"),
            ("context / window pattern", f"{cfg['sequence_len']} / {cfg['window_pattern']}"),
            ("vocab", cfg["vocab_size"]),
            ("parameters", total and f"{total:,}"),
            ("pretraining data", meta.get("dataset") or uc.get("dataset")),
            (f"training tokens ({source})", tokens and f"{tokens:,}"),
            ("validation bits per byte", bpb is not None and f"{bpb:.4f}"),
            *[(name, f"{value:.4f}") for name, value in (meta.get("metrics") or {}).items()
              if isinstance(value, (int, float))]]
    prompt = ['ids = tok("<|bos|>The capital of France is", return_tensors="pt").input_ids'
              '  # continues text'] if source == "base" else [
        'ids = tok.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}],',
        '    add_generation_prompt=True, return_tensors="pt", return_dict=False)']
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [nanochat]", "---", "", f"# nanochat d{cfg['n_layer']} ({source})", "",
             "A [nanochat](https://github.com/karpathy/nanochat) model exported with "
             "`python -m scripts.export_hf`.", "", "| | |", "|---|---|",
             *[f"| {name} | {value} |" for name, value in rows if value],
             "", "## Use", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "tok = AutoTokenizer.from_pretrained(REPO, trust_remote_code=True)",
             "model = AutoModelForCausalLM.from_pretrained(REPO, trust_remote_code=True)", *prompt,
             "print(tok.decode(model.generate(ids, max_new_tokens=128)[0, ids.size(1):], "
             "skip_special_tokens=True))", "```", "",
             "The tokenizer recognizes the special tokens (`<|bos|>`, `<|user_start|>`, "
             "...) written in text, as chat templates need; nanochat itself never does for "
             "user text: pass `split_special_tokens=True` to encode untrusted text the way "
             "nanochat does. Padded batches and beam search are not supported.", "",
             "With nanochat: download the directory, then `python -m scripts.chat_cli -i DIR` or "
             "`python -m scripts.chat_web -i DIR`.", ""]
    if report_text:
        lines += ["## Training report", "", report_text.strip(), ""]
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# Export / import

def export_model(state, meta, tokenizer, out_dir, source="sft", dtype=None, report_text=None):
    """
    Write the HF directory. state: the checkpoint's state dict (each tensor keeps its dtype unless
    dtype is given); meta: the checkpoint's meta (model_config, tokenizer_fingerprint, metrics...).
    Every file is written to a temp name and renamed; model.safetensors goes last but one, the
    README last.
    """
    from safetensors.torch import save_file
    cfg = meta["model_config"]
    state = {k.removeprefix("_orig_mod."): v.detach().cpu() for k, v in state.items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    wte = state["transformer.wte.weight"]  # embeddings are kept in the dtype the model computes in
    os.makedirs(out_dir, exist_ok=True)
    write = lambda name, text: atomic_write_text(os.path.join(out_dir, name), text)
    dump = lambda name, obj: write(name, json.dumps(obj, indent=2))
    for name in REMOTE_CODE:
        with open(os.path.join(TEMPLATE_DIR, name), encoding="utf-8") as f:
            write(name, f.read())
    bos, end = tokenizer.encode_special("<|bos|>"), tokenizer.encode_special("<|assistant_end|>")
    dump("config.json", {
        "architectures": ["NanoChatForCausalLM"], "model_type": MODEL_TYPE,
        "auto_map": {"AutoConfig": "configuration_nanochat.NanoChatConfig",
                     "AutoModelForCausalLM": "modeling_nanochat.NanoChatForCausalLM"},
        **{k: cfg[k] for k in GPT_FIELDS}, "padded_vocab_size": wte.size(0),
        "bos_token_id": bos, "eos_token_id": end, "dtype": str(wte.dtype).removeprefix("torch."),
        "use_cache": True, "tie_word_embeddings": False})
    dump("generation_config.json", {"bos_token_id": bos, "eos_token_id": [end, bos],
                                    "pad_token_id": bos})
    write("tokenizer.json", hf_tokenizer_json(tokenizer))
    dump("tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                   "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>",
                                   "pad_token": "<|bos|>", "model_max_length": cfg["sequence_len"],
                                   "clean_up_tokenization_spaces": False})
    write("chat_template.jinja", CHAT_TEMPLATE)
    # resume-only state (data-loader positions) says nothing about the model and can be large
    dump(META_FILE, {k: v for k, v in meta.items() if k != "dataloader_state_dict"})
    with atomic_path(os.path.join(out_dir, WEIGHTS_FILE)) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"format": "pt"})
    write("README.md", model_card(meta, source, report_text))

def load_export(export_dir, device, phase="eval"):
    """-> (GPT, Tokenizer, meta) from a directory written
    by export_model (or downloaded from the Hub)."""
    from nanochat.checkpoint import model_from_state  # checkpoint imports this module: import here
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError(f"loading {export_dir} needs the safetensors package: pip "
                          f"install safetensors (or pip install -e '.[hf]')") from None
    path = lambda name: os.path.join(export_dir, name)
    config = read_json(path("config.json"))
    if config.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{export_dir}/config.json has model_type "
                         f"{config.get('model_type')!r}, not {MODEL_TYPE!r}: only directories "
                         f"written by `python -m scripts.export_hf` load as nanochat models")
    missing = [name for name in (WEIGHTS_FILE, "tokenizer.json") if not os.path.exists(path(name))]
    if missing:
        raise FileNotFoundError(f"{export_dir} lacks {missing}: download the whole directory, "
                                f"or re-export it")
    meta = read_json(path(META_FILE)) if os.path.exists(path(META_FILE)) else {}
    # config.json is what transformers runs: it wins
    meta["model_config"] = {k: config[k] for k in GPT_FIELDS}
    state = load_file(path(WEIGHTS_FILE), device="cpu")
    model = model_from_state(meta["model_config"], state, torch.device(device), phase)
    tokenizer = tokenizer_from_hf_json(path("tokenizer.json"))
    recorded = meta.get("tokenizer_fingerprint")
    if recorded is not None and recorded != tokenizer.fingerprint():
        raise ValueError(f"{export_dir}/tokenizer.json is not the tokenizer this model was "
                         f"trained with (fingerprint {tokenizer.fingerprint()[:16]}... vs "
                         f"{recorded[:16]}... in {META_FILE}): re-export it")
    if tokenizer.get_vocab_size() != config["vocab_size"]:
        raise ValueError(f"{export_dir}: tokenizer vocab {tokenizer.get_vocab_size()} != model's "
                         f"{config['vocab_size']}")
    return model, tokenizer, meta
