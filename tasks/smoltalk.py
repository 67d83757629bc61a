"""
SmolTalk: general chat conversations (HuggingFaceTB/smol-smoltalk), ~460K train / ~24K test rows.

    from tasks.smoltalk import SmolTalk
    train = SmolTalk(split="train")  # downloads the hub's parquet export once to <base>/task_data/

Training data only (no evaluate): it teaches the model to hold a conversation.
Leaves out: the full 1M-row smoltalk (the "smol" version is sized for small models).
"""

from tasks.common import HubTask

def smoltalk_conversation(row):
    """A row's messages (optional leading system, then strict user/assistant alternation)."""
    messages = row["messages"]
    assert len(messages) >= 2, f"SmolTalk row has {len(messages)} messages, expected at least 2"
    first = 1 if messages[0]["role"] == "system" else 0
    for i, message in enumerate(messages[first:], start=first):
        expected = "user" if (i - first) % 2 == 0 else "assistant"
        role = message["role"]
        assert role == expected, f"message {i} has role {role!r}, expected {expected!r}"
        assert isinstance(message["content"], str), f"message {i} content is not a string"
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}


class SmolTalk(HubTask):
    eval_type = "generative"
    conversation = staticmethod(smoltalk_conversation)
    repo, splits = "HuggingFaceTB/smol-smoltalk", {"default": ("train", "test")}

    def __init__(self, split, **kwargs):
        super().__init__("default", split, **kwargs)
