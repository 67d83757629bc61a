"""
ARC (allenai/ai2_arc): grade-school science multiple choice, Easy and Challenge sets.

    from tasks.arc import ARC
    ARC(subset="ARC-Easy", split="test")        # 2,376 rows; ARC-Challenge test has 1,172; also train/validation

Categorical: the allowed answers are the dataset's own labels (usually A-D, a few rows use 1-4 or 5
choices).
"""

from tasks.common import HubTask, mc_conversation, evaluate_letter

def arc_conversation(row):
    letters, choices = row["choices"]["label"], row["choices"]["text"]
    assert row["answerKey"] in letters, f"ARC answer {row['answerKey']!r} is not one of the labels {letters}"
    return mc_conversation(row["question"], letters, choices, row["answerKey"])


class ARC(HubTask):
    eval_type = "categorical"
    evaluate = staticmethod(evaluate_letter)
    conversation = staticmethod(arc_conversation)

    def __init__(self, subset, split, **kwargs):
        assert subset in ("ARC-Easy", "ARC-Challenge"), f"ARC subset must be ARC-Easy or ARC-Challenge, got {subset!r}"
        assert split in ("train", "validation", "test"), f"ARC split must be train/validation/test, got {split!r}"
        super().__init__("allenai/ai2_arc", subset, split, **kwargs)
