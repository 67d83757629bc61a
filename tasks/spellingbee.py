"""
SpellingBee and SimpleSpelling: generated tasks that teach a token-level model to see letters.

    from tasks.spellingbee import SpellingBee, SimpleSpelling
    SpellingBee(size=80_000, split="train")      # "How many r are in strawberry?" -> count + python
    SimpleSpelling(size=200_000, split="train")  # "Spell the word: apple" -> "apple:a,p,p,l,e"

Words come from dwyl/english-words words_alpha.txt (370K words), downloaded once to
<base>/words_alpha.txt. Example i is generated from random.Random(i) for train and random.Random(i +
10,000,000) for test, so the splits never share a seed. SpellingBee is graded like GSM8K ("#### N");
SimpleSpelling by exact match. Leaves out: non-ASCII words (the list is a-z only).
"""

import os
import random
import string

from nanochat.common import get_base_dir, download_file_with_lock
from tasks.common import Task, qa_conversation, calculator_conversation, evaluate_answer

WORD_LIST_URL = ("https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/"
                 "words_alpha.txt")
TEST_SEED_OFFSET = 10_000_000

# {letter} and {word} are filled in (maybe quoted); "?" is appended half the time, so none ends in
# punctuation. 51 phrasings as the published recipe has (30 English, 4 Spanish, 4 Chinese, 4 Korean,
# 3 French, 3 German, 3 Japanese), so the skill does not hang on one wording or one language.
TEMPLATES_BY_LANGUAGE = {
    "en": ["How many {letter} are in the word {word}",
           "How many times does the letter {letter} appear in {word}",
           "Count the number of {letter} in {word}", "How many {letter}s are there in {word}",
           "In the word {word}, how many times does {letter} occur",
           "What is the count of the letter {letter} in {word}",
           "Tell me how many {letter} the word {word} contains",
           "How often does {letter} show up in {word}",
           "Can you count how many {letter} are in {word}", "Number of {letter} in {word}",
           "How many {letter} does {word} have", "How many letter {letter} are in {word}",
           "How many times is {letter} in {word}", "Count the {letter} in {word}",
           "How many occurrences of {letter} are there in {word}",
           "What's the number of {letter} in the word {word}",
           "Please count the letter {letter} in {word}",
           "I need the number of times {letter} appears in {word}", "{word}: how many {letter}",
           "How many {letter} can you find in {word}",
           "Give me the count of {letter} in the word {word}",
           "Find how many times {letter} appears in {word}", "In {word}, count the letter {letter}",
           "How many instances of the letter {letter} does {word} contain",
           "Could you tell me how many {letter} are in {word}",
           "Spell {word} and count the {letter}", "What is the frequency of {letter} in {word}",
           "How many copies of {letter} are in {word}",
           "Letter {letter} in the word {word}: how many times",
           "Calculate how many {letter} there are in {word}"],
    "es": ["¿Cuántas veces aparece la letra {letter} en la palabra {word}",
           "Cuenta cuántas {letter} hay en {word}", "¿Cuántas letras {letter} tiene {word}",
           "¿Cuántas {letter} hay en la palabra {word}"],
    "zh": ["单词{word}中有几个字母{letter}", "{word}这个词里字母{letter}出现了几次", "数一数{word}里有多少个{letter}",
           "{word}中{letter}出现了多少次"],
    "ko": ["{word}라는 단어에 {letter}가 몇 개 있나요", "{word}에서 {letter}는 몇 번 나오나요",
           "{word}에 들어 있는 {letter}의 개수를 세어 주세요", "단어 {word}에 글자 {letter}가 몇 개인가요"],
    "fr": ["Combien de fois la lettre {letter} apparaît-elle dans le mot {word}",
           "Compte les {letter} dans {word}", "Combien y a-t-il de {letter} dans {word}"],
    "de": ["Wie oft kommt der Buchstabe {letter} im Wort {word} vor",
           "Zähle die Buchstaben {letter} in {word}", "Wie viele {letter} hat das Wort {word}"],
    "ja": ["{word}という単語に{letter}はいくつありますか", "{word}の中に{letter}は何回出てきますか",
           "{word}に含まれる{letter}の数を数えてください"],
}
TEMPLATES = [template for templates in TEMPLATES_BY_LANGUAGE.values() for template in templates]

def load_words():
    path = os.path.join(get_base_dir(), "words_alpha.txt")
    try:
        download_file_with_lock(WORD_LIST_URL, path)
    except RuntimeError as e:
        raise RuntimeError(f"{e}. SpellingBee/SimpleSpelling need the word list: "
                           f"download {WORD_LIST_URL} to {path}") from e
    with open(path, encoding="utf-8") as f:
        words = [line.strip() for line in f if line.strip()]
    assert words, f"{path} is empty; delete it and rerun to download {WORD_LIST_URL} again"
    return words

def spelling_bee_conversation(word, letter, user_message):
    """The answer: spell the word, walk it letter by letter
    keeping a count, then confirm with a python call."""
    count = word.count(letter)
    walk = [f"{i}:{char} hit! count={word[:i].count(letter)}" if char == letter else f"{i}:{char}"
            for i, char in enumerate(word, start=1)]
    manual = (f"We are asked to count the letter '{letter}' in the word '{word}'. Let me first "
              f"count by hand.\n\nSpelling out the word:\n{word}:{','.join(word)}\n\nWalking "
              f"through the letters and looking for '{letter}':\n" + "\n".join(walk) + "\n\n"
              f"This gives us {count}.\n\nLet me double check this using Python:\n\n")
    final = f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"
    return calculator_conversation(user_message, manual, f"'{word}'.count('{letter}')", str(count),
                                   final)


class WordTask(Task):
    """size generated examples; example i of a split is
    drawn from random.Random(i (+ offset for test))."""
    eval_type = "generative"

    def __init__(self, size=1000, split="train", words=None, **kwargs):
        super().__init__(**kwargs)
        assert split in ("train", "test"), f"split must be 'train' or 'test', got {split!r}"
        self.size, self.split = size, split
        self.words = words if words is not None else load_words()

    def num_examples(self):
        return self.size

    def rng_and_word(self, index):
        rng = random.Random(index + (TEST_SEED_OFFSET if self.split == "test" else 0))
        return rng, rng.choice(self.words)


class SpellingBee(WordTask):
    evaluate = staticmethod(evaluate_answer)

    def get_example(self, index):
        rng, word = self.rng_and_word(index)
        # the published recipe's draws in its order (word, letter, template, case, quotes, "?"):
        # from the same word list, example i asks about the same word and letter, in the same
        # language (TEMPLATES is grouped alike)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(string.ascii_lowercase)
        template = rng.choice(TEMPLATES)
        template = template.lower() if rng.random() < 0.3 else template
        quote_letter, quote_word = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
        message = template.format(letter=f"{quote_letter}{letter}{quote_letter}",
                                  word=f"{quote_word}{word}{quote_word}")
        message += "?" if rng.random() < 0.5 else ""
        return spelling_bee_conversation(word, letter, message)


class SimpleSpelling(WordTask):
    """User "Spell the word: apple", assistant "apple:a,p,p,l,e"
    (the spelled form SpellingBee's answers start from)."""
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the word list shuffled with seed 42, as the published recipe: else example i would spell
        # SpellingBee's word i
        self.words = list(self.words)
        random.Random(42).shuffle(self.words)

    def get_example(self, index):
        _, word = self.rng_and_word(index)
        return qa_conversation(f"Spell the word: {word}", f"{word}:{','.join(word)}")

    def evaluate(self, conversation, assistant_response):
        return assistant_response.strip() == conversation["messages"][-1]["content"]
