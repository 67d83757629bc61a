"""
Tasks: slicing and mixing, the multiple-choice format, each dataset's conversation form on hand-written rows,
the hub parquet download (against a 127.0.0.1 server), CustomJSON validation and the synthetic tasks.
"""

import io
import json
import os
import random
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.engine import use_calculator
from tasks.common import Task, TaskMixture, TaskSequence, render_mc, load_hub_dataset, extract_answer
from tasks.mmlu import mmlu_conversation
from tasks.arc import ARC, arc_conversation
from tasks.gsm8k import GSM8K, gsm8k_conversation
from tasks.humaneval import HumanEval, humaneval_conversation, humaneval_program, extract_imports, extract_program
from tasks.smoltalk import smoltalk_conversation
from tasks import spellingbee
from tasks.spellingbee import SpellingBee, SimpleSpelling, TEMPLATES, TEMPLATES_BY_LANGUAGE
from tasks.customjson import CustomJSON
from tasks.synthetic import SyntheticIdentity, SyntheticMath, SyntheticSpelling, SyntheticMC, IDENTITY, CATEGORIES


class Numbers(Task):
    """Example i is the int offset + i (a stand-in dataset)."""
    def __init__(self, n, offset=0, **kwargs):
        super().__init__(**kwargs)
        self.n, self.offset = n, offset

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return self.offset + index

def assistant_text(conversation):
    """What the model would emit for the reference answer (parts joined; tool delimiters don't matter to graders)."""
    content = conversation["messages"][-1]["content"]
    return content if isinstance(content, str) else "".join(part["text"] for part in content)

# -----------------------------------------------------------------------------
# Framework

def test_task_slicing():
    assert [Numbers(10)[i] for i in range(len(Numbers(10)))] == list(range(10))
    view = Numbers(10, start=2, stop=9, step=3)
    assert len(view) == 3 and [view[i] for i in range(3)] == [2, 5, 8]  # ceil((9 - 2) / 3) = 3
    assert len(Numbers(10, start=1, step=4)) == 3                        # 1, 5, 9
    assert len(Numbers(10, stop=100)) == 10                              # stop beyond the data is clamped
    with pytest.raises(AssertionError):
        view[3]

def test_task_mixture_covers_each_example_once_deterministically_interleaved():
    a, b = Numbers(50), Numbers(30, offset=100)
    tasks = [a, b]
    mix = TaskMixture(tasks)
    items = [mix[i] for i in range(len(mix))]
    assert sorted(items) == list(range(50)) + list(range(100, 130))
    assert items == [TaskMixture([a, b])[i] for i in range(80)]  # same order for a fresh instance
    assert any(x >= 100 for x in items[:50]) and any(x < 50 for x in items[50:])  # interleaved, not a then b
    twice = TaskMixture([a, a, b])
    counts = np.bincount([twice[i] for i in range(len(twice))])
    assert len(twice) == 130 and (counts[:50] == 2).all() and (counts[100:130] == 1).all()

def test_task_sequence_is_plain_concatenation():
    seq = TaskSequence([Numbers(3), Numbers(2, offset=10)])
    assert [seq[i] for i in range(len(seq))] == [0, 1, 2, 10, 11]

def test_render_mc_exact_format():
    text = render_mc("What is 2+2?", ["A", "B"], ["4", "5"])
    assert text == ("Multiple Choice question: What is 2+2?\n- 4=A\n- 5=B\n\n"
                    "Respond only with the letter of the correct answer.")

def test_extract_answer():
    assert extract_answer("so the total is\n#### 1,234") == "1234"
    assert extract_answer("#### 18.") == "18." and extract_answer("#### -7.5 dollars") == "-7.5"
    assert extract_answer("#### 3\n#### 4") == "3"  # the first marker counts
    assert extract_answer("no marker 42") is None and extract_answer("####18") is None
    assert extract_answer("#### $5") is None

# -----------------------------------------------------------------------------
# Conversation forms on hand-written rows

def test_mmlu_conversation_and_auxiliary_nesting():
    row = {"question": "Capital of France?", "subject": "geography", "choices": ["Rome", "Paris", "Oslo", "Bern"],
           "answer": 1}
    conv = mmlu_conversation(row)
    assert conv["messages"][0]["content"] == render_mc("Capital of France?", list("ABCD"), row["choices"])
    assert "- Paris=B\n" in conv["messages"][0]["content"]
    assert conv["messages"][1] == {"role": "assistant", "content": "B"}
    assert conv["letters"] == ["A", "B", "C", "D"] and conv["subject"] == "geography"
    assert mmlu_conversation({"train": row}) == conv  # auxiliary_train rows are nested in a "train" column

def test_arc_conversation_uses_dataset_labels():
    row = {"id": "x", "question": "Which is a gas?", "answerKey": "3",
           "choices": {"text": ["rock", "water", "steam"], "label": ["1", "2", "3"]}}
    conv = arc_conversation(row)
    assert conv["letters"] == ["1", "2", "3"] and conv["messages"][1]["content"] == "3"
    assert conv["messages"][0]["content"].endswith("- steam=3\n\nRespond only with the letter of the correct answer.")

def test_gsm8k_calculator_annotations_become_tool_parts():
    row = {"question": "Natalia sold clips to 48 friends in April, and half as many in May. How many in total?",
           "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn total 48+24 = <<48+24=72>>72 clips.\n#### 72"}
    conv = gsm8k_conversation(row)
    assert conv["messages"][0] == {"role": "user", "content": row["question"]}
    assert conv["messages"][1]["content"] == [
        {"type": "text", "text": "In May she sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips.\nIn total 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips.\n#### 72"},
    ]
    grade = GSM8K.evaluate
    assert grade(None, conv, "<|python_start|>48+24<|python_end|> so\n#### 72")
    assert not grade(None, conv, "#### 71") and not grade(None, conv, "72")
    big = gsm8k_conversation({"question": "q", "answer": "#### 1,200"})
    assert grade(None, big, "#### 1200") and grade(None, big, "#### 1,200")

def test_gsm8k_grade_and_rl_reward_reject_a_trailing_period():
    """OpenAI's normalization only removes commas: "#### 18." is the string "18.", not 18. RL rewards the grade."""
    conv = gsm8k_conversation({"question": "q", "answer": "6 * 3 = <<6*3=18>>18\n#### 18"})
    task = GSM8K.__new__(GSM8K)  # grading needs no data
    assert task.evaluate(conv, "#### 18") and task.reward(conv, "So:\n#### 18 apples") == 1.0
    assert not task.evaluate(conv, "#### 18.") and task.reward(conv, "The answer is\n#### 18.") == 0.0
    assert task.reward(conv, "#### 18.0") == 0.0 and task.reward(conv, "18") == 0.0

HUMANEVAL_ROW = {
    "task_id": "HumanEval/0",
    "prompt": 'from typing import List\nimport math\n\n\ndef add(a: int, b: int) -> int:\n    """Add two numbers."""\n',
    "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}

def test_humaneval_program_assembly():
    conv = humaneval_conversation(HUMANEVAL_ROW)
    assert conv["messages"][1]["content"] == HUMANEVAL_ROW["prompt"] + "\n" + HUMANEVAL_ROW["canonical_solution"]
    assert extract_imports(HUMANEVAL_ROW["prompt"]) == "from typing import List\nimport math"
    fenced = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nand ```python\nother()\n```"
    program = humaneval_program(conv, fenced)
    assert program == ("from typing import List\nimport math\n\ndef add(a, b):\n    return a + b\n\n"
                       + HUMANEVAL_ROW["test"] + "\ncheck(add)")

@pytest.mark.parametrize("completion, code", [
    ("```python\ndef f():\n    return 1\n```", "def f():\n    return 1"),                 # language tag
    ("```\ndef f():\n    return 1\n```", "def f():\n    return 1"),                       # no language tag
    ("Sure:\n```python\nx = 1\n```\nThis sets x. ```python\ny = 2\n```", "x = 1"),      # text around: first block
    ("```python  \n\n  x = 1  \n\n```trailing", "x = 1"),                                # whitespace stripped
    ("  def f(): return 1\n", "def f(): return 1"),                                     # no fence: all, stripped
    ("```python\nx = 1```", "```python\nx = 1```"),                                       # closing fence not on a line
    ("```py\nx = 1\n```\ny = 2\n```", "y = 2"),                                      # "py" is no tag: 2nd fence opens
])
def test_humaneval_code_extraction(completion, code):
    assert extract_program(completion) == code

def test_humaneval_grading_runs_the_tests():
    conv = humaneval_conversation(HUMANEVAL_ROW)
    assert HumanEval.evaluate(None, conv, "```python\n" + conv["messages"][1]["content"] + "```")
    assert not HumanEval.evaluate(None, conv, "def add(a, b):\n    return a - b\n")

def test_smoltalk_conversation():
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello!"}], "source": "x"}
    assert smoltalk_conversation(row) == {"messages": row["messages"]}
    with pytest.raises(AssertionError, match="role 'user', expected 'assistant'"):
        smoltalk_conversation({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})

def test_spelling_bee_answer_and_determinism():
    words = ["strawberry", "banana", "mississippi"]
    train, test = SpellingBee(50, "train", words=words), SpellingBee(50, "test", words=words)
    assert [train[i] for i in range(50)] == [SpellingBee(50, "train", words=words)[i] for i in range(50)]
    assert [train[i] for i in range(50)] != [test[i] for i in range(50)]
    for conv in [train[i] for i in range(50)]:
        parts = conv["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
        word, letter = re.fullmatch(r"'(\w+)'\.count\('(\w)'\)", parts[1]["text"]).groups()
        count = word.count(letter)
        assert parts[2]["text"] == str(count) and f"This gives us {count}." in parts[0]["text"]
        assert f"{word}:{','.join(word)}" in parts[0]["text"]
        assert parts[0]["text"].count("hit!") == count and (count == 0 or f"hit! count={count}" in parts[0]["text"])
        assert parts[3]["text"].endswith(f"#### {count}")
        assert train.evaluate(conv, assistant_text(conv)) and not train.evaluate(conv, f"#### {count + 1}")
    many = [f"word{chr(97 + i)}{chr(97 + j)}" for i in range(8) for j in range(8)]
    bee, simple = SpellingBee(50, words=many), SimpleSpelling(50, words=many)
    shuffled = list(many)
    random.Random(42).shuffle(shuffled)  # SimpleSpelling's own word order
    for i in range(50):
        assert simple[i]["messages"][0]["content"] == f"Spell the word: {random.Random(i).choice(shuffled)}"
    same = sum(simple[i]["messages"][0]["content"].split()[-1] in assistant_text(bee[i]) for i in range(50))
    assert same < 5, same  # not SpellingBee's word i (1 in 64 by chance)
    spell = SimpleSpelling(3, words=["apple"])
    assert spell[0]["messages"] == [{"role": "user", "content": "Spell the word: apple"},
                                    {"role": "assistant", "content": "apple:a,p,p,l,e"}]
    assert spell.evaluate(spell[0], " apple:a,p,p,l,e ") and not spell.evaluate(spell[0], "apple:a,p,l,e")

def test_spelling_bee_has_the_51_templates_by_language():
    counts = {language: len(templates) for language, templates in TEMPLATES_BY_LANGUAGE.items()}
    assert counts == {"en": 30, "es": 4, "zh": 4, "ko": 4, "fr": 3, "de": 3, "ja": 3}
    assert len(set(TEMPLATES)) == 51
    script = {"zh": "[\u4e00-\u9fff]", "ja": "[\u3040-\u30ff]", "ko": "[\uac00-\ud7af]"}
    for language, pattern in script.items():  # the CJK ones are written in their own script (kana for Japanese)
        assert all(re.search(pattern, t) for t in TEMPLATES_BY_LANGUAGE[language]), language
    assert not any(re.search(script["ja"], t) for t in TEMPLATES_BY_LANGUAGE["zh"])

@pytest.mark.parametrize("template", TEMPLATES)
def test_every_spelling_bee_template_renders_and_is_answerable(template, monkeypatch):
    assert template.count("{letter}") == 1 and template.count("{word}") == 1, template
    monkeypatch.setattr(spellingbee, "TEMPLATES", [template])
    task = SpellingBee(40, "train", words=["strawberry", "banana", "mississippi"])
    for conv in [task[i] for i in range(40)]:
        question = conv["messages"][0]["content"]
        word, letter = re.fullmatch(r"'(\w+)'\.count\('(\w)'\)", conv["messages"][1]["content"][1]["text"]).groups()
        # the template, maybe lowercased, with the letter and the word (each maybe quoted), maybe a "?" after
        filled = re.escape(template).replace(r"\{letter\}", f"(?P<q1>[\"']?){letter}(?P=q1)")
        filled = filled.replace(r"\{word\}", f"(?P<q2>[\"']?){word}(?P=q2)")
        assert re.fullmatch(filled + r"\??", question, flags=re.IGNORECASE), (template, question)
        count = word.count(letter)
        assert task.evaluate(conv, f"{word}:{','.join(word)}\n\n#### {count}")
        assert not task.evaluate(conv, f"#### {count + 1}")

def test_custom_json(tmp_path):
    good = tmp_path / "chats.jsonl"
    turn = lambda user, assistant: [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    chats = [json.dumps(turn("Who are you?", "nanochat")), "", json.dumps(turn("a", "b") + turn("c", "d")), ""]
    good.write_text("\n".join(chats))
    task = CustomJSON(str(good))
    assert len(task) == 2 and task[1]["messages"][2] == {"role": "user", "content": "c"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text().splitlines()[0] + "\n"
                   + json.dumps([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: message 1 has role 'user', expected 'assistant'"):
        CustomJSON(str(bad))
    bad.write_text('[{"role": "user", "content": "a"}]\n')
    with pytest.raises(ValueError, match=r"line 1: a conversation needs at least 2 messages"):
        CustomJSON(str(bad))
    bad.write_text('[{"role": "user", "content": "a"}, {"role": "assistant", "content": ["x"]}]\n')
    with pytest.raises(ValueError, match=r"line 1: message 1 content must be a string"):
        CustomJSON(str(bad))
    with pytest.raises(FileNotFoundError, match=r"curl -L -o .*identity_conversations\.jsonl https://"):
        CustomJSON(str(tmp_path / "identity_conversations.jsonl"))

# -----------------------------------------------------------------------------
# Hub parquet download

def parquet_bytes(rows):
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()

ARC_ROWS = [{"id": str(i), "question": f"Question {i}?", "answerKey": "B",
             "choices": {"text": [f"wrong {i}", f"right {i}"], "label": ["A", "B"]}} for i in range(7)]

@pytest.fixture
def arc_hub(http_server, base_dir, monkeypatch):
    """ARC-Easy/test served as two parquet shards (listed out of order: shards are sorted by number)."""
    prefix = "/api/datasets/allenai/ai2_arc/parquet/ARC-Easy/test"
    http_server.routes[prefix + "/0.parquet"] = parquet_bytes(ARC_ROWS[:4])
    http_server.routes[prefix + "/1.parquet"] = parquet_bytes(ARC_ROWS[4:])
    http_server.routes[prefix] = json.dumps([f"{http_server.url}{prefix}/{i}.parquet" for i in (1, 0)]).encode()
    monkeypatch.setenv("NANOCHAT_HF_URL", http_server.url)
    return http_server

def test_hub_dataset_download_once_and_read(arc_hub, base_dir):
    ds = load_hub_dataset("allenai/ai2_arc", "ARC-Easy", "test")
    assert len(ds) == 7 and [ds[i]["id"] for i in range(7)] == [str(i) for i in range(7)]
    assert ds[5] == ARC_ROWS[5]
    data_dir = base_dir / "task_data" / "allenai--ai2_arc" / "ARC-Easy" / "test"
    assert sorted(os.listdir(data_dir)) == ["00000.parquet", "00001.parquet", "manifest.json"]
    assert json.loads((data_dir / "manifest.json").read_text())["files"] == ["00000.parquet", "00001.parquet"]
    hits = dict(arc_hub.hits)
    again = load_hub_dataset("allenai/ai2_arc", "ARC-Easy", "test")
    assert arc_hub.hits == hits and again[6] == ds[6]  # second load: no requests at all

def test_hub_dataset_shuffle_is_numpy_permutation_and_leaves_original(arc_hub):
    ds = load_hub_dataset("allenai/ai2_arc", "ARC-Easy", "test")
    shuffled = ds.shuffle(seed=42)
    perm = np.random.default_rng(42).permutation(7)
    assert [shuffled[i]["id"] for i in range(7)] == [str(j) for j in perm]
    assert [ds[i]["id"] for i in range(7)] == [str(i) for i in range(7)]
    twice = shuffled.shuffle(seed=1)
    assert [twice[i]["id"] for i in range(7)] == [str(perm[j]) for j in np.random.default_rng(1).permutation(7)]

def test_arc_task_end_to_end_from_hub(arc_hub):
    task = ARC(subset="ARC-Easy", split="test", stop=3)
    order = np.random.default_rng(42).permutation(7)  # tasks shuffle with seed 42
    assert len(task) == 3
    assert task[0]["messages"][0]["content"].startswith(f"Multiple Choice question: Question {order[0]}?")
    assert task.evaluate(task[0], "B") and not task.evaluate(task[0], "A")

def test_hub_dataset_missing_offline_says_how_to_fetch(http_server, base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_HF_URL", http_server.url)  # serves nothing: 404 like an unreachable hub
    monkeypatch.setattr("nanochat.common.time.sleep", lambda s: None)
    with pytest.raises(RuntimeError) as e:
        load_hub_dataset("openai/gsm8k", "main", "test")
    message = str(e.value)
    assert f"{http_server.url}/api/datasets/openai/gsm8k/parquet/main/test" in message
    assert str(base_dir / "task_data" / "openai--gsm8k" / "main" / "test") in message and "manifest.json" in message

# -----------------------------------------------------------------------------
# Synthetic tasks

SYNTHETIC = [SyntheticIdentity, SyntheticMath, SyntheticSpelling, SyntheticMC]

@pytest.mark.parametrize("cls", SYNTHETIC)
def test_synthetic_deterministic_and_reference_answers_pass(cls):
    a = [cls("train", size=200, seed=0)[i] for i in range(200)]
    assert a == [cls("train", size=200, seed=0)[i] for i in range(200)]
    assert a != [cls("train", size=200, seed=1)[i] for i in range(200)]
    task = cls("test", size=50)
    for conv in a[:50] + [task[i] for i in range(50)]:
        assert task.evaluate(conv, assistant_text(conv)), conv
    if cls.eval_type == "generative":
        assert not any(task.evaluate(conv, "#### 100000 I don't know") for conv in a[:50])

@pytest.mark.parametrize("cls", SYNTHETIC)
def test_synthetic_train_and_test_are_disjoint(cls):
    def last_user(conv):
        return [m["content"] for m in conv["messages"] if m["role"] == "user"][-1]
    train = {last_user(cls("train", size=2000)[i]) for i in range(2000)}
    test = {last_user(cls("test", size=300)[i]) for i in range(300)}
    if cls is SyntheticIdentity:  # held-out phrasings: never seen in training, in any turn
        train_all = {m["content"] for i in range(2000) for m in cls("train", size=2000)[i]["messages"]}
        assert len(test) == len(IDENTITY) and not test & train_all
    else:
        assert len(test) > 250 and not test & train

def test_synthetic_math_tool_calls_match_the_engine_calculator():
    for conv in [SyntheticMath("train", size=300)[i] for i in range(300)]:
        text, python, output, answer = conv["messages"][1]["content"]
        assert str(use_calculator(python["text"])) == output["text"] == str(eval(python["text"]))
        assert answer["text"] == f"\n\n#### {output['text']}"
        numbers = [int(n) for n in re.findall(r"\d+", python["text"])]
        assert all(str(n) in conv["messages"][0]["content"] for n in numbers)  # the problem states its numbers

def test_synthetic_spelling_counts_are_right():
    for conv in [SyntheticSpelling("train", size=300)[i] for i in range(300)]:
        python, output = conv["messages"][1]["content"][1:3]
        word, letter = re.fullmatch(r"'(\w+)'\.count\('(\w)'\)", python["text"]).groups()
        assert output["text"] == str(word.count(letter)) == str(use_calculator(python["text"]))
        assert word in conv["messages"][0]["content"]

def test_synthetic_mc_answers_are_right_and_letters_balanced():
    convs = [SyntheticMC("train", size=1000)[i] for i in range(1000)]
    letters = [c["messages"][1]["content"] for c in convs]
    assert all(0.2 < letters.count(x) / 1000 < 0.3 for x in "ABCD")  # chance = 1/4
    for conv in convs:
        prompt = conv["messages"][0]["content"]
        question = prompt.split("\n")[0].removeprefix("Multiple Choice question: ")
        choices = dict(line[2:].rsplit("=", 1)[::-1] for line in prompt.split("\n")[1:5])
        answer = choices[conv["messages"][1]["content"]]
        assert len(set(choices.values())) == 4, prompt
        if question == "Which number is the largest?":
            assert int(answer) == max(map(int, choices.values()))
        elif question == "Which number is the smallest?":
            assert int(answer) == min(map(int, choices.values()))
        elif question.startswith("What is ") and "+" in question:
            a, b = re.fullmatch(r"What is (\d+) \+ (\d+)\?", question).groups()
            assert int(answer) == int(a) + int(b)
        elif question.startswith("Which letter comes right after"):
            assert ord(answer) == ord(question.split()[5]) + 1
        elif question.startswith("Which choice is the word"):
            assert answer == question.split()[-1].rstrip("?")
        elif question.startswith("Which of these is"):
            category = re.fullmatch(r"Which of these is an? (.+)\?", question).group(1)
            assert [c in CATEGORIES[category] for c in choices.values()].count(True) == 1
            assert answer in CATEGORIES[category]
        else:
            assert question == "Which of these numbers is even?"
            assert [int(c) % 2 for c in choices.values()].count(0) == 1
            assert int(answer) % 2 == 0
