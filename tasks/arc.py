"""
ARC (allenai/ai2_arc): grade-school science multiple choice, Easy and Challenge sets.

    from tasks.arc import ARC
    ARC(subset="ARC-Easy", split="test")  # 2,376 rows (ARC-Challenge 1,172); also train, validation

Categorical: the allowed answers are the dataset's own labels (usually A-D, a few rows use 1-4 or 5
choices).
"""

from tasks.common import HubTask, mc_conversation, evaluate_letter

def arc_conversation(row):
    letters, answer = row["choices"]["label"], row["answerKey"]
    assert answer in letters, f"ARC answer {answer!r} is not one of the labels {letters}"
    return mc_conversation(row["question"], letters, row["choices"]["text"], answer)


class ARC(HubTask):
    eval_type = "categorical"
    evaluate = staticmethod(evaluate_letter)
    conversation = staticmethod(arc_conversation)
    repo = "allenai/ai2_arc"
    splits = dict.fromkeys(["ARC-Easy", "ARC-Challenge"], ("train", "validation", "test"))
