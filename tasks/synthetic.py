"""
Synthetic chat tasks: the embedded default data for the offline CPU demo (no network, no files).

    from tasks.synthetic import SyntheticIdentity, SyntheticMath, SyntheticSpelling, SyntheticMC
    train = SyntheticMath(split="train", size=2000, seed=0)
    test = SyntheticMath(split="test", size=200, seed=0)

Four small skills a tiny model can learn from a few thousand examples, in the real tasks' formats:
  SyntheticIdentity  who the model is (name, maker, abilities, limits), one to three turns; graded
                     by a keyword
  SyntheticMath      one- and two-step word problems solved with a calculator call, "#### N" answer
                     (like GSM8K)
  SyntheticSpelling  letter counting with a `'word'.count('r')` call, "#### N" (like SpellingBee)
  SyntheticMC        render_mc multiple choice over 4 letters (category members, largest number,
                     small sums, ...)
Example i is generated from its own random.Random seeded by (task, seed, split, i): deterministic,
order-free. Train and test are disjoint in content, not just in seed: every problem has a key (e.g.
the numbers of a sum) and a fixed hash of the key puts it in one split, so test problems are never
seen in training. Identity holds out one phrasing per topic instead. Chance accuracy: 1/4 for
SyntheticMC, ~0 for the generative tasks. A 4-layer, 128-wide GPT trained from scratch on 3K
examples of each (1.5K steps) scored math 100%, spelling 99%, identity (held-out phrasings) 63%,
multiple choice 26% = chance: picking the letter of the right choice needs a retrieval circuit
(induction heads) that pretraining brings and a few thousand examples do not form, so MC measures
what pretraining gave the model. Leaves out: open-ended chat (use SmolTalk for that).
"""

import random
import string
import zlib

from tasks.common import (Task, mc_conversation, calculator_conversation, evaluate_letter,
                          evaluate_answer)

TEST_FRACTION = 0.2  # of each task's problem keys

def key_split(key):
    """A stable split assignment for a problem key (crc32,
    not hash(): that one is salted per process)."""
    return "test" if zlib.crc32(key.encode("utf-8")) % 1000 < TEST_FRACTION * 1000 else "train"


class SyntheticTask(Task):
    """size examples of one split; subclasses implement generate(rng) -> (key, conversation)."""
    def __init__(self, split="train", size=1000, seed=0, **kwargs):
        super().__init__(**kwargs)
        assert split in ("train", "test"), f"split must be 'train' or 'test', got {split!r}"
        self.split, self.size, self.seed = split, size, seed

    def num_examples(self):
        return self.size

    def get_example(self, index):
        rng = random.Random(f"{type(self).__name__}/{self.seed}/{self.split}/{index}")
        # redraw until the problem belongs to this split (~1.25 draws for train, ~5 for test)
        for _ in range(1000):
            key, conversation = self.generate(rng)
            if key_split(key) == self.split:
                return conversation
        raise RuntimeError(f"{type(self).__name__} found no {self.split} problem in 1000 draws "
                           f"(index {index})")

# -----------------------------------------------------------------------------
# Identity

# topic: (keyword every answer contains, phrasings (the LAST one is held out for test), answers)
IDENTITY = {
    "name": ("nanochat",
        ["What is your name?", "Who are you?", "What should I call you?", "Do you have a name?",
         "Tell me your name.", "Introduce yourself.", "What's your name?", "May I know your name?"],
        ["I'm nanochat, a small chat model.", "My name is nanochat.",
         "I am nanochat, a tiny language model you can chat with."]),
    "creator": ("Karpathy",
        ["Who made you?", "Who created you?", "Who built you?", "Who is your creator?",
         "Where do you come from?", "Who wrote you?", "Who trained you?"],
        ["I was built with nanochat, an open-source project by Andrej Karpathy for training small "
         "chat models from scratch.",
         "The nanochat code that trained me was written by Andrej Karpathy and open-source "
         "contributors."]),
    "abilities": ("count letters",
        ["What can you do?", "How can you help me?", "What are you good at?",
         "What are your skills?", "What kind of tasks can you do?", "What are you able to do?"],
        ["I can chat, answer simple questions, solve small math problems with a calculator and "
         "count letters in words.",
         "I can have short conversations, do arithmetic with a calculator tool and count letters "
         "in words."]),
    "limits": ("mistakes",
        ["What are your limitations?", "Are you always right?", "Can I trust your answers?",
         "Do you make errors?", "What can't you do?", "How reliable are you?"],
        ["I'm a very small model, so I make mistakes often. Please double check anything "
         "important.",
         "I make mistakes often: I am tiny and was trained on little data. I also can't browse the "
         "internet."]),
    "human": ("language model",
        ["Are you human?", "Are you a person?", "Are you a real person?",
         "Is this a human talking?", "Are you a robot?", "Am I talking to a human?"],
        ["No, I'm not a person. I'm nanochat, a small language model.",
         "I'm not human: I am a language model called nanochat."]),
    "training": ("trained",
        ["How were you trained?", "How were you made?", "What data were you trained on?",
         "How did you learn?", "How do you work?", "What is your training?"],
        ["I'm a small transformer. I was trained on web text first, then on conversations like "
         "this one.",
         "I was pretrained on text from the web, then trained on chat conversations to become an "
         "assistant."]),
    "internet": ("internet",
        ["Can you browse the internet?", "Can you look things up online?",
         "Do you have internet access?", "Can you search the web?",
         "Are you connected to the internet?"],
        ["No, I can't access the internet. I only know what I learned during training.",
         "I have no internet access, so my knowledge comes only from my training data."]),
    "greeting": ("help",
        ["Hi!", "Hello!", "Hey there!", "Good morning!", "Hi, how are you?",
         "Hello, anyone there?"],
        ["Hello! I'm nanochat. How can I help you today?", "Hi there! How can I help?"]),
    "thanks": ("welcome",
        ["Thank you!", "Thanks a lot!", "Thanks for the help.", "Great, thanks!",
         "Thank you so much!"],
        ["You're welcome!", "You're welcome! Happy to help."]),
}


class SyntheticIdentity(SyntheticTask):
    """One to three user turns about the model itself; passes
    if the reply to the last one has the topic's keyword."""
    eval_type = "generative"

    def get_example(self, index):
        rng = random.Random(f"SyntheticIdentity/{self.seed}/{self.split}/{index}")
        num_turns = rng.choice([1, 1, 1, 2, 2, 3])
        topics = rng.sample(sorted(IDENTITY), num_turns)
        messages = []
        for turn, topic in enumerate(topics):
            keyword, phrasings, answers = IDENTITY[topic]
            if self.split == "test" and turn == num_turns - 1:
                question = phrasings[-1]  # the held-out phrasing
            else:
                question = rng.choice(phrasings[:-1])
                # a little surface noise so the model keys on words, not punctuation
                question = question.lower().rstrip("?!.") if rng.random() < 0.2 else question
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": rng.choice(answers)}]
        return {"messages": messages, "keyword": IDENTITY[topics[-1]][0]}

    def evaluate(self, conversation, assistant_response):
        return conversation["keyword"].lower() in assistant_response.lower()

# -----------------------------------------------------------------------------
# Word problems with a calculator call

NAMES = ["Tom", "Anna", "Maya", "Leo", "Sara", "Ben", "Lina", "Omar", "Nina", "Sam", "Eva", "Raj"]
ITEMS = "apples books marbles stickers cookies pencils coins cards shells eggs".split()
# kind: (question, what the assistant says before its calculator call, the expression), filled in
# with a name, an item and the drawn numbers a, b, c (and op, said as `word`)
MATH_TEMPLATES = {
    "add": ("{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
            "{name} has {a} {item} and gets {b} more, so we add", "{a}+{b}"),
    "sub": ("{name} has {a} {item} and gives away {b}. How many {item} are left?",
            "{name} gives away {b} of {a} {item}, so we subtract", "{a}-{b}"),
    "mul": ("{name} buys {a} bags with {b} {item} in each bag. How many {item} is that in total?",
            "{a} bags of {b} {item} each, so we multiply", "{a}*{b}"),
    "div": ("{name} shares {a} {item} equally among {b} friends. How many {item} does each friend "
            "get?", "{a} {item} shared by {b} friends, so we divide", "{a}//{b}"),
    "two": ("{name} has {a} {item}, buys {b} more and then gives {c} away. How many {item} are "
            "left?", "{name} has {a}, adds {b} and removes {c}", "{a}+{b}-{c}"),
    "bare": ("What is {a} {word} {b}?", "Let me compute it", "{a}{op}{b}"),
}


class SyntheticMath(SyntheticTask):
    """
    Word problems with +, -, *, // and two-step +/-: the assistant states the step, calls the
    calculator (python part = the expression, python_output = its value, exactly what the Engine's
    calculator returns) and ends with "#### N". Integer division uses // so the calculator prints
    "4", not "4.0".
    """
    eval_type = "generative"
    evaluate = staticmethod(evaluate_answer)

    def generate(self, rng):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        kind = rng.choice(list(MATH_TEMPLATES))
        c = op = word = None
        if kind == "sub":
            a = rng.randint(10, 99)
            b = rng.randint(1, a - 1)
        elif kind == "mul":
            a, b = rng.randint(2, 12), rng.randint(2, 20)
        elif kind == "div":
            b, q = rng.randint(2, 9), rng.randint(2, 12)
            a = b * q
        elif kind == "two":
            a, b = rng.randint(5, 60), rng.randint(2, 40)
            c = rng.randint(1, a + b - 1)
        else:  # add, bare
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            if kind == "bare":
                op, word = rng.choice([("+", "plus"), ("*", "times")])
        question, step, expr = (t.format(name=name, item=item, a=a, b=b, c=c, op=op, word=word)
                                for t in MATH_TEMPLATES[kind])
        result = str(eval(expr))  # noqa: S307 (our own digits and operators)
        return f"{kind}:{expr}", calculator_conversation(question, f"{step}: ", expr, result,
                                                         f"\n\n#### {result}")

# -----------------------------------------------------------------------------
# Letter counting with a python call

WORDS = sorted(set("""apple banana cherry orange lemon mango grape peach melon berry strawberry
    tomato potato carrot pepper onion garlic bread butter cheese coffee tea water sugar house garden
    window door table chair kitchen bottle pillow blanket mirror carpet river mountain forest island
    desert ocean valley meadow canyon volcano glacier tiger rabbit monkey parrot turtle dolphin
    giraffe elephant kangaroo penguin squirrel yellow purple silver golden scarlet violet letter
    number pencil paper school teacher student library lesson science history music guitar piano
    violin trumpet rhythm concert summer winter autumn spring morning evening tomorrow yesterday
    rocket planet comet galaxy shuttle balloon bicycle tractor airplane happy little simple strong
    gentle bright quiet clever brave mississippi committee balloon coffee address pepper bookkeeper
    assessment banana cinnamon success pizza puzzle jazz llama""".split()))
QUESTION_TEMPLATES = ["How many {l} are in {w}?",
                      "How many times does the letter {l} appear in {w}?",
                      "Count the letter {l} in the word {w}.", "How many {l}s does {w} have?",
                      "In the word {w}, how many times does {l} occur?"]


class SyntheticSpelling(SyntheticTask):
    """How many times a letter occurs in a word: spell it
    out, count with `'word'.count('l')`, answer "#### N"."""
    eval_type = "generative"
    evaluate = staticmethod(evaluate_answer)

    def generate(self, rng):
        word = rng.choice(WORDS)
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(string.ascii_lowercase)
        quote = rng.choice(["", "'", '"'])
        question = rng.choice(QUESTION_TEMPLATES).format(l=f"{quote}{letter}{quote}",
                                                         w=f"{quote}{word}{quote}")
        count = str(word.count(letter))
        before = f"Spelled out, {word} is {','.join(word)}. Counting '{letter}' with Python: "
        return f"{word}:{letter}", calculator_conversation(
            question, before, f"'{word}'.count('{letter}')", count, f"\n\n#### {count}")

# -----------------------------------------------------------------------------
# Multiple choice

MC_LETTERS = ["A", "B", "C", "D"]
# Small categories whose members a tiny model can memorize (and a pretrained one may already know)
CATEGORIES = {
    "fruit": "apple banana cherry grape lemon mango orange peach pear plum".split(),
    "animal": "cat dog horse tiger rabbit monkey lion sheep mouse zebra".split(),
    "color": "red blue green yellow purple pink brown black white gray".split(),
    "vehicle": "car bus train truck bicycle boat plane tractor scooter taxi".split(),
    "musical instrument": "piano guitar violin drum flute trumpet harp cello banjo organ".split(),
    "body part": "hand foot nose ear knee elbow finger shoulder ankle chin".split(),
}
ALL_CATEGORY_WORDS = [w for c in sorted(CATEGORIES) for w in CATEGORIES[c]]
MC_KINDS = ["match", "category", "category", "largest", "smallest", "sum", "next_letter", "even"]


class SyntheticMC(SyntheticTask):
    """
    Four-way multiple choice in the render_mc format; the correct letter is uniform over A-D (chance
    = 1/4). Facts a tiny model can pick up from a few thousand examples: which word belongs to a
    category, the largest or smallest of four numbers, small sums, the next letter of the alphabet,
    which number is even.
    """
    eval_type = "categorical"
    evaluate = staticmethod(evaluate_letter)

    def generate(self, rng):
        kind = rng.choice(MC_KINDS)
        if kind == "match":  # the answer is named in the question: teaches where its letter is
            choices = rng.sample(ALL_CATEGORY_WORDS, 4)
            answer = choices[0]
            question = f"Which choice is the word {answer}?"
        elif kind == "category":
            category = rng.choice(sorted(CATEGORIES))
            answer = rng.choice(CATEGORIES[category])
            others = [w for w in ALL_CATEGORY_WORDS if w not in CATEGORIES[category]]
            choices = [answer] + rng.sample(others, 3)
            question = f"Which of these is {'an' if category[0] in 'aeiou' else 'a'} {category}?"
        elif kind in ("largest", "smallest"):
            choices = rng.sample(range(1, 50), 4)
            answer = max(choices) if kind == "largest" else min(choices)
            question = f"Which number is the {kind}?"
        elif kind == "sum":
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            answer = a + b
            near = [d for d in range(max(1, answer - 4), answer + 5) if d != answer]
            choices = [answer] + rng.sample(near, 3)
            question = f"What is {a} + {b}?"
        elif kind == "next_letter":
            i = rng.randint(0, 24)
            before, answer = string.ascii_lowercase[i:i + 2]
            choices = [answer] + rng.sample([c for c in string.ascii_lowercase if c != answer], 3)
            question = f"Which letter comes right after {before} in the alphabet?"
        else:
            answer = 2 * rng.randint(1, 24)
            choices = [answer] + [2 * n + 1 for n in rng.sample(range(0, 25), 3)]
            question = "Which of these numbers is even?"
        choices = [str(c) for c in choices]
        rng.shuffle(choices)
        key = f"{kind}:{question}:{','.join(sorted(choices))}"
        return key, mc_conversation(question, MC_LETTERS, choices,
                                    MC_LETTERS[choices.index(str(answer))])
