"""Task generators for the study zoo (issue 8): more toy skills, each with an exact scorer, drawn from the default
zoo's vocabulary (its tokenizer has no commas, brackets or capital B/C/D/G/P/R, so the templates avoid them).

These generators use their own random streams (`study/<task>/...`); the default zoo's generators, streams and
templates in `corpus.py` are untouched, so the default zoo builds bit for bit as before.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from evomerge.zoo import corpus
from evomerge.zoo.corpus import (
    CITIES,
    COLORS,
    FOODS,
    OBJECTS,
    Example,
    Fact,
    sample_facts,
)

# the item words of corpus.ITEMS that are one word (lists of them are counted, reversed)
WORDS = [en for en, _, _ in corpus.ITEMS if " " not in en]


def en_value(fact: Fact) -> str:
    """The English answer phrase of a fact: 'red bag', 'Tokyo', 'sushi'."""
    if fact.relation == "has":
        return f"{COLORS[fact.value[0]][0]} {OBJECTS[fact.value[1]][0]}"
    return (CITIES if fact.relation == "lives" else FOODS)[fact.value[0]][0]


def en_qa_example(rng: random.Random) -> Example:
    """English reading comprehension: 2-3 facts about different people, one asked; the gold is the phrase."""
    facts = sample_facts(rng, rng.randint(2, 3), distinct_relations=True)
    asked = rng.choice(facts)
    return Example(" ".join(f.en() for f in facts) + " " + asked.en_question(), en_value(asked), " " + asked.en())


def count_example(rng: random.Random) -> Example:
    """How often one word occurs in a list of 2-9 words."""
    target = rng.choice(WORDS)
    count = rng.randint(1, 5)
    words = [target] * count + [rng.choice([w for w in WORDS if w != target]) for _ in range(rng.randint(1, 4))]
    rng.shuffle(words)
    return Example(f"{' '.join(words)}. How many {target}?", str(count), f" {count}")


def _number_list(rng: random.Random, low: int, high: int) -> list[int]:
    while True:
        numbers = rng.sample(range(1, 21), rng.randint(low, high))
        if numbers != sorted(numbers):
            return numbers


def sort_example(rng: random.Random) -> Example:
    """Sort 3-5 distinct numbers ascending; the gold 'is 3 5 8 12.' is anchored at both ends, so 13 5 8 12 fails."""
    numbers = _number_list(rng, 3, 5)
    answer = " ".join(str(n) for n in sorted(numbers))
    return Example(" ".join(str(n) for n in numbers), f"is {answer}.", f" The list is {answer}.")


def reverse_example(rng: random.Random) -> Example:
    """Reverse a list of 3-5 distinct words."""
    words = rng.sample(WORDS, rng.randint(3, 5))
    answer = " ".join(reversed(words))
    return Example(" ".join(words), f"is {answer}.", f" The list is {answer}.")


def _cut(text: str, completion: str, answer: int) -> Example:
    """A pretraining-form text cut before its final `completion`; the prompt is what precedes it."""
    assert text.endswith(completion), (text, completion)
    return Example(text[: -len(completion)], str(answer), completion)


def equations_example(rng: random.Random) -> Example:
    """Held out: the last of 2-5 equations in the base's pretraining form, one per line (`3 + 4 = 7`), its result
    left out -- arithmetic the base learned from its text; no expert is taught this form."""
    problems = [corpus.sample_problem(rng) for _ in range(rng.randint(2, 5))]
    last = problems[-1].result
    return _cut("\n".join(p.equation for p in problems), f" {last}", last)


def en_story_example(rng: random.Random) -> Example:
    """Held out: an English worked story of the base's pretraining, cut after `Now Tom has` (the gold is the result)."""
    problem = corpus.sample_problem(rng)
    return _cut(corpus.en_worked_story(problem), corpus.en_worked_result(problem), problem.result)


def ja_story_example(rng: random.Random) -> Example:
    """Held out: a Japanese worked story of the base's pretraining, cut after `今、太郎はりんごを` (gold: the result)."""
    problem = corpus.sample_problem(rng)
    return _cut(corpus.ja_worked_story(problem), corpus.ja_worked_result(problem), problem.result)


def en_ja_example(rng: random.Random) -> Example:
    """Translate one English fact sentence into Japanese (names map by position: Tom = 太郎, ...); exact sentence."""
    fact = sample_facts(rng, 1)[0]
    return Example(fact.en(), fact.ja(), " " + fact.ja())


def ja_en_example(rng: random.Random) -> Example:
    """Translate one Japanese fact sentence into English; exact sentence."""
    fact = sample_facts(rng, 1)[0]
    return Example(fact.ja(), fact.en(), " " + fact.en())


STUDY_EXAMPLES: dict[str, Callable[[random.Random], Example]] = {
    "toy_en_qa": en_qa_example,
    "toy_count": count_example,
    "toy_sort": sort_example,
    "toy_reverse": reverse_example,
    "toy_en_ja": en_ja_example,
    "toy_ja_en": ja_en_example,
    "toy_equations": equations_example,
    "toy_en_story": en_story_example,
    "toy_ja_story": ja_story_example,
}
# Held-out tasks in the base's own pretraining form (completions, no wrapper): a row must not be pretraining *text*.
COMPLETION = ("toy_equations", "toy_en_story", "toy_ja_story")
# Tasks whose gold answer is itself a sentence another task asks about: a held-out row's answer is kept out of
# training as well as its question (an EN->JA test sentence is never a JA->EN training target, and vice versa).
TRANSLATION = ("toy_en_ja", "toy_ja_en")


def held_out_keys(task: str, example: Example) -> set[str]:
    return {example.question, example.answer} if task in TRANSLATION else {example.question}


@dataclass(frozen=True)
class Pretraining:
    """What the base read: its generic Q:/A: questions and its whole text, which evaluation rows must avoid."""

    questions: frozenset[str]
    text: str

    @classmethod
    def of(cls, documents: list[str]) -> Pretraining:
        questions = frozenset(doc[3:].split("\nA:", 1)[0] for doc in documents if doc.startswith("Q: "))
        return cls(questions, "\n\n".join(documents))

    def contains(self, task: str, example: Example) -> bool:
        """A completion row is seen if its prompt occurs anywhere in the text (the base may have memorized it);
        any other row if its question was one of the Q:/A: questions."""
        return example.question in self.text if task in COMPLETION else example.question in self.questions


def study_task_splits(task: str, seed: int, sizes: dict[str, int], pretraining: Pretraining) -> dict[str, list[Example]]:
    """Evaluation splits with no question shared between them and none the base read in pretraining."""
    rng = random.Random(f"study/{task}/eval/{seed}")
    seen: set[str] = set()
    splits: dict[str, list[Example]] = {}
    for split, size in sizes.items():
        rows: list[Example] = []
        while len(rows) < size:
            example = STUDY_EXAMPLES[task](rng)
            if example.question not in seen and not pretraining.contains(task, example):
                seen.add(example.question)
                rows.append(example)
        splits[split] = rows
    return splits


def study_training_examples(task: str, seed: int, count: int, exclude: set[str]) -> list[Example]:
    """Fine-tuning pairs for a study task (or a default-zoo task), never touching a held-out question (or, for
    translation, a held-out sentence on either side)."""
    if task not in STUDY_EXAMPLES:
        return corpus.training_examples(task, seed, count, exclude)
    rng = random.Random(f"study/{task}/train/{seed}")
    examples: list[Example] = []
    while len(examples) < count:
        example = STUDY_EXAMPLES[task](rng)
        if not held_out_keys(task, example) & exclude:
            examples.append(example)
    return examples


def instruction_pairs(seed: int, count: int, exclude: set[str]) -> list[tuple[str, str]]:
    """The 'instruction tune' of the base: generic 2-3-fact reading comprehension in both languages behind the
    `Q:`/`A:` wrapper the base met in pretraining, as (prompt, completion) pairs with the loss on the answer."""
    rng = random.Random(f"study/instruct/{seed}")
    pairs = []
    while len(pairs) < count:
        document = corpus.generic_qa_document(rng, exclude)
        question, answer = document.split("\nA:", 1)
        pairs.append((question + "\nA:", answer))
    return pairs
