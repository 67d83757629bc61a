"""
MMLU (cais/mmlu): 4-way multiple choice over 57 subjects.

    from tasks.mmlu import MMLU
    MMLU(subset="auxiliary_train", split="train")  # ~100K rows (ARC, MC_TEST, OBQA, RACE): training
    MMLU(subset="all", split="test")               # 14,042 rows to evaluate (also validation, dev)

Categorical: the model answers with one of the letters A-D (render_mc format).
"""

from tasks.common import HubTask, mc_conversation, evaluate_letter

LETTERS = ["A", "B", "C", "D"]

def mmlu_conversation(row):
    # The auxiliary_train export nests every row inside a "train" struct column.
    if set(row) == {"train"}:
        row = row["train"]
    assert len(row["choices"]) == 4, f"MMLU row has {len(row['choices'])} choices, expected 4"
    # "subject" lets evaluation group accuracy by subject
    return mc_conversation(row["question"], LETTERS, row["choices"], LETTERS[row["answer"]],
                           subject=row["subject"])


class MMLU(HubTask):
    eval_type = "categorical"
    evaluate = staticmethod(evaluate_letter)
    conversation = staticmethod(mmlu_conversation)
    repo = "cais/mmlu"
    splits = {"all": ("test", "validation", "dev"), "auxiliary_train": ("train",)}
