"""
HumanEval (openai/openai_humaneval): 164 Python functions to complete, graded by running their unit
tests.

    from tasks.humaneval import HumanEval
    HumanEval()

Generative: the completion's code is assembled into a program (imports from the prompt + the
completion's code + the dataset's test code + check(entry_point)) and run in nanochat.execution's
sandbox (5 s, 256 MiB); it passes iff the program exits cleanly. The sandbox isolates it in Linux
namespaces where bubblewrap is installed, and says so loudly where not (see nanochat/execution.py).
"""

import re

from nanochat.execution import execute_code
from tasks.common import HubTask, qa_conversation

# The published nanochat HumanEval scores use this extraction, so ours does too, quirks included:
# the opening fence must end its line and the closing one start a line; "```py" is no opening fence
# (its closing fence may then open a block); the block or, without one, the whole completion is
# stripped (a body-only answer loses its first indent).
CODE_BLOCK_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)

def extract_imports(prompt):
    """The import lines at the top of a prompt (blank lines and comments may sit between them)."""
    imports = []
    for line in map(str.strip, prompt.split("\n")):
        if line.startswith(("import ", "from ")):
            imports.append(line)
        elif line and not line.startswith("#"):
            break
    return "\n".join(imports)

def extract_program(completion):
    """The first ```python (or bare ```) fenced block, else the whole completion (models often
    answer bare code); either stripped of surrounding whitespace."""
    match = CODE_BLOCK_RE.search(completion)
    return (match.group(1) if match else completion).strip()

def humaneval_program(conversation, completion):
    """The program whose clean exit means the completion passes."""
    imports = extract_imports(conversation["messages"][0]["content"])
    return (f"{imports}\n\n{extract_program(completion)}\n\n{conversation['test']}\n"
            f"check({conversation['entry_point']})")

def humaneval_conversation(row):
    return qa_conversation(row["prompt"], row["prompt"] + "\n" + row["canonical_solution"],
                           entry_point=row["entry_point"], test=row["test"])


class HumanEval(HubTask):
    eval_type = "generative"
    conversation = staticmethod(humaneval_conversation)
    repo, splits = "openai/openai_humaneval", {"openai_humaneval": ("test",)}

    def __init__(self, **kwargs):
        super().__init__("openai_humaneval", "test", **kwargs)

    def evaluate(self, conversation, assistant_response):
        program = humaneval_program(conversation, assistant_response)
        return execute_code(program, timeout=5.0).success
