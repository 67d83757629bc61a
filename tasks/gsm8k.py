"""
GSM8K (openai/gsm8k, "main"): grade-school math word problems, 7,473 train / 1,319 test.

    from tasks.gsm8k import GSM8K
    GSM8K(subset="main", split="test")

The reference solutions carry calculator annotations "<<48/2=24>>". We turn each into a python part
(48/2) and a python_output part (24), so the model learns to call the calculator and the Engine
feeds the result back at test time.
Generative: a response passes when its "#### N" equals the reference's (commas removed). RL reward =
1.0 / 0.0.
"""

import re

from tasks.common import HubTask, qa_conversation, evaluate_answer

CALC_RE = re.compile(r"(<<[^>]*>>)")

def gsm8k_assistant_parts(answer):
    """Text between annotations stays text; each
    <<expr=result>> becomes python + python_output parts."""
    parts = []
    for piece in CALC_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, sep, result = piece[2:-2].rpartition("=")
            assert sep, f"calculator annotation {piece!r} has no '='"
            parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts

def gsm8k_conversation(row):
    return qa_conversation(row["question"], gsm8k_assistant_parts(row["answer"]))


class GSM8K(HubTask):
    eval_type = "generative"
    conversation = staticmethod(gsm8k_conversation)
    repo, splits = "openai/gsm8k", dict.fromkeys(["main", "socratic"], ("train", "test"))

    def evaluate(self, conversation, assistant_response):
        assert isinstance(assistant_response, str), "GSM8K grades the decoded completion text"
        return evaluate_answer(conversation, assistant_response)
