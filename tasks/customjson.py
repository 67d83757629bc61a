"""
CustomJSON: your own conversations from a JSONL file, one JSON array of {"role", "content"} messages
per line.

    from tasks.customjson import CustomJSON
    CustomJSON(filepath=os.path.join(get_base_dir(), "identity_conversations.jsonl"))

Each line must hold at least 2 messages alternating user, assistant, user, ... with string content,
e.g.
    [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I'm nanochat."}]
The whole file is checked when loaded; a bad line raises an error naming the file, the line and the
problem. Training data only (no evaluate). Used for the identity conversations (IDENTITY_URL) or any
data you write.
"""

import os
import json

from tasks.common import Task

IDENTITY_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"

def parse_conversation_line(line):
    """The messages of one JSONL line; raises ValueError describing what is wrong."""
    try:
        messages = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(messages, list):
        raise ValueError(f"expected a JSON array of messages, got {type(messages).__name__}")
    if len(messages) < 2:
        raise ValueError(f"a conversation needs at least 2 messages, got {len(messages)}")
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be an object with 'role' and 'content', "
                             f"got {message!r}")
        if message["role"] != expected:
            raise ValueError(f"message {i} has role {message['role']!r}, expected {expected!r} "
                             f"(strict user/assistant alternation)")
        if not isinstance(message["content"], str):
            raise ValueError(f"message {i} content must be a string, "
                             f"got {type(message['content']).__name__}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class CustomJSON(Task):
    eval_type = "generative"

    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        if not os.path.exists(filepath):
            hint = ("write one JSON array of {\"role\", \"content\"} messages per line "
                    "(see tasks/customjson.py)")
            if os.path.basename(filepath) == "identity_conversations.jsonl":
                hint = f"download the identity conversations: curl -L -o {filepath} {IDENTITY_URL}"
            raise FileNotFoundError(f"CustomJSON file {filepath} does not exist: {hint}")
        self.conversations = []
        with open(filepath, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                try:
                    if line.strip():
                        self.conversations.append({"messages": parse_conversation_line(line)})
                except ValueError as e:
                    raise ValueError(f"{filepath}, line {line_number}: {e}") from None

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]
