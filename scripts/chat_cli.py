"""
Chat with a trained model in the terminal, one GPU/CPU, replies streamed token by token.

    python -m scripts.chat_cli           # newest sft model; 'quit'/'exit' leaves, 'clear' restarts
    python -m scripts.chat_cli -i rl -g d20 -s 400 -t 0.8
    python -m scripts.chat_cli -p "Why is the sky blue?"     # answer once and exit
    python -m scripts.chat_cli -i base -p "The capital of France is"  # base: continues the text

The conversation is kept as messages and rendered each turn by tokenizer.render_for_completion (the
chat format of training); a reply goes back in as the parts it was made of, so a calculator call
stays one. A base model never saw that format, so with -i base every line is a fresh plain-text
prompt to continue (completion mode). Tool calls (the calculator) run inside the Engine and show as
a line of their own: `[calculator] 12*30 = 360`. Leaves out: system prompts, editing earlier turns,
multi-GPU.
"""

import argparse
import sys

from nanochat.engine import add_dtype_flag

parser = argparse.ArgumentParser(description="Chat with a model in the terminal")
parser.add_argument("-i", "--source", default="sft", help="base|mid|sft|rl (base = completion "
                    "mode), or a directory written by scripts.export_hf")
parser.add_argument("-g", "--model-tag", default=None, help="e.g. d20 (default: the largest d<N>)")
parser.add_argument("-s", "--step", type=int, default=None, help="default: the newest")
parser.add_argument("-p", "--prompt", help="answer this prompt and exit")
parser.add_argument("-t", "--temperature", type=float, default=0.6, help="0 = greedy")
parser.add_argument("-k", "--top-k", type=int, default=50, help="the k likeliest (-1 = all)")
parser.add_argument("-m", "--max-tokens", type=int, default=256, help="most tokens per reply")
parser.add_argument("--device-type", default="", help="cuda|cpu|mps (empty = autodetect)")
add_dtype_flag(parser)
args = parser.parse_args()
if args.prompt is not None and args.prompt.strip() in ("", "clear", "quit", "exit"):
    parser.error(f"-p {args.prompt!r}: give a message to send")

from nanochat.common import compute_init
from nanochat.checkpoint import load_model
from nanochat.engine import Engine, ReplyStream, check_sampling, prepare_for_inference

# -----------------------------------------------------------------------------
# Load

top_k = None if args.top_k == -1 else args.top_k
try:
    check_sampling(args.temperature, top_k)  # before minutes of loading
    _, _, _, _, device = compute_init(args.device_type)
    model, tokenizer, _ = load_model(args.source, device, model_tag=args.model_tag, step=args.step)
    prepare_for_inference(model, args.dtype)
except (FileNotFoundError, ValueError, RuntimeError) as e:  # bad flags or artifacts: say which
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
engine = Engine(model, tokenizer)
context = model.config.sequence_len
completion_mode = args.source == "base"

# How each part of a reply starts on the terminal: a calculator call gets a line of its own, its
# result follows on that line, and the text after it starts a new line.
OPENERS = {"python": "\n[calculator] ", "python_output": " = "}

def stream_reply(tokens, seed):
    """Generate after `tokens`, printing each part as it
    arrives; returns the reply's parts (engine.ReplyStream)."""
    stream = ReplyStream(tokenizer)  # whole characters only
    shown, kind, line_start = -1, "text", False  # the part on screen, its type

    def show(events):
        nonlocal shown, kind, line_start
        for i, text in events:
            if i != shown:
                previous, kind, shown = kind, stream.parts[i]["type"], i
                if previous == "python" and kind != "python_output":  # the calculator refused it
                    print(" (no result)", end="")
                line_start = kind == "text" and previous != "text"
                print(("\n" if line_start else "") + OPENERS.get(kind, ""), end="")
            if line_start:  # the text after a tool line starts its own line: no leading space
                text = text.lstrip()
                line_start = not text
            print(text, end="", flush=True)

    for column, _ in engine.generate(tokens, max_tokens=min(args.max_tokens, context - len(tokens)),
                                     temperature=args.temperature, top_k=top_k, seed=seed):
        if column[0] in engine.stop_tokens:
            break
        show(stream.push(column[0]))
    show(stream.flush())
    print(flush=True)
    return stream.parts

# -----------------------------------------------------------------------------
# Chat loop

def typed_lines():
    """Lines typed at the prompt until EOF or Ctrl-C; a line that is not valid text is skipped."""
    while True:
        try:
            yield input("\nUser: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        except UnicodeDecodeError as e:  # e.g. Latin-1 typed in a UTF-8 terminal
            print(f"(that line is not valid {sys.stdin.encoding} text: {e.reason} "
                  f"at byte {e.start}; set your terminal to UTF-8 or type it again)")

if completion_mode:
    print("base model: completion mode (no chat format), each line a plain-text prompt to continue")
elif not args.prompt:
    print("nanochat: type a message; 'clear' starts over, 'quit' or 'exit' leaves")
messages, turn = [], 0
for line in [args.prompt] if args.prompt else typed_lines():
    line = line.strip()
    if line in ("quit", "exit"):
        break
    if line == "clear":
        messages = []
        print("(conversation cleared)")
        continue
    if not line:
        continue

    user = {"role": "user", "content": line}
    prompt = (tokenizer.encode(line, prepend=tokenizer.get_bos_token_id()) if completion_mode
              else tokenizer.render_for_completion({"messages": messages + [user]}))
    if len(prompt) >= context:
        print(f"(the conversation is {len(prompt)} tokens, the model's context {context}: "
              f"type 'clear' to start over)")
        if args.prompt:
            sys.exit(1)
        continue
    print("" if completion_mode else "\nAssistant: ", end="", flush=True)
    try:
        parts = stream_reply(prompt, seed=42 + turn)
    except ValueError as e:  # -m Engine rejects for this model: every turn would fail the same way
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    turn += 1
    messages += [user, {"role": "assistant", "content": parts}]
