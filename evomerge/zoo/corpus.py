"""Synthetic bilingual data for the toy zoo: facts, arithmetic word problems, and the task rows built from them.

Everything is drawn from a seeded `random.Random`, so a zoo is a pure function of its seed. The same generators make
the base's pretraining text (statements and worked sums inside stories, in both languages, but never a question
behind a Q/A wrapper), the experts' fine-tuning pairs, and the evaluation rows, which training pairs never repeat.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

EN_NAMES = ["Tom", "Anna", "Ken", "Lucy", "Mike", "Emma", "Sam", "Mary", "John", "Lily"]
JA_NAMES = ["太郎", "花子", "健太", "さくら", "大輔", "美咲", "翔太", "愛", "次郎", "陽菜"]
# (English plural, Japanese noun, Japanese counter)
ITEMS = [
    ("apples", "りんご", "個"),
    ("pencils", "えんぴつ", "本"),
    ("books", "本", "冊"),
    ("sheets of paper", "紙", "枚"),
    ("cookies", "クッキー", "枚"),
    ("cards", "カード", "枚"),
    ("balls", "ボール", "個"),
    ("flowers", "花", "本"),
    ("cups", "コップ", "個"),
    ("eggs", "たまご", "個"),
    ("candies", "あめ", "個"),
    ("stamps", "切手", "枚"),
    ("notebooks", "ノート", "冊"),
    ("bottles", "ボトル", "本"),
]
COLORS = [("red", "赤い"), ("blue", "青い"), ("white", "白い"), ("black", "黒い"), ("yellow", "黄色い"), ("green", "緑の")]
OBJECTS = [("bag", "かばん"), ("hat", "ぼうし"), ("umbrella", "かさ"), ("shirt", "シャツ"), ("bike", "じてんしゃ"), ("cat", "ねこ")]
CITIES = [
    ("Tokyo", "東京"), ("Osaka", "大阪"), ("Kyoto", "京都"), ("Nagoya", "名古屋"), ("Sapporo", "札幌"),
    ("Fukuoka", "福岡"), ("Kobe", "神戸"), ("Yokohama", "横浜"), ("Sendai", "仙台"), ("Hiroshima", "広島"),
]
FOODS = [
    ("sushi", "すし"), ("ramen", "ラーメン"), ("curry", "カレー"), ("soba", "そば"), ("udon", "うどん"),
    ("tempura", "てんぷら"), ("bread", "パン"), ("cake", "ケーキ"), ("oranges", "みかん"), ("rice", "ごはん"),
]
EN_GAIN = ["buys {b} more {item}", "gets {b} more {item}", "finds {b} more {item}"]
EN_LOSS = ["gives {b} {item} to {other}", "loses {b} {item}", "uses {b} {item}"]
JA_GAIN = ["{b}{c}買いました。", "{b}{c}もらいました。", "{b}{c}見つけました。"]
JA_LOSS = ["{other}に{b}{c}あげました。", "{b}{c}なくしました。", "{b}{c}使いました。"]


@dataclass(frozen=True)
class Problem:
    """One arithmetic word problem; rendered in either language from the same numbers."""

    name: int
    other: int
    item: int
    a: int
    b: int
    add: bool
    verb: int
    distractor: tuple[int, int, int] | None  # (name, item, count) of an irrelevant sentence

    @property
    def result(self) -> int:
        return self.a + self.b if self.add else self.a - self.b

    @property
    def equation(self) -> str:
        return f"{self.a} {'+' if self.add else '-'} {self.b} = {self.result}"


def sample_problem(rng: random.Random) -> Problem:
    add = rng.random() < 0.5
    if add:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
    else:
        a = rng.randint(2, 20)
        b = rng.randint(1, a - 1)
    name, other = rng.sample(range(len(EN_NAMES)), 2)
    distractor = None
    if rng.random() < 0.3:
        distractor = (rng.choice([i for i in range(len(EN_NAMES)) if i != name]), rng.randrange(len(ITEMS)), rng.randint(1, 20))
    return Problem(name, other, rng.randrange(len(ITEMS)), a, b, add, rng.randrange(3), distractor)


def en_story(p: Problem) -> tuple[str, str]:
    """(setup sentences, question) in English."""
    name, other, (item, _, _) = EN_NAMES[p.name], EN_NAMES[p.other], ITEMS[p.item]
    pronoun_verb = (EN_GAIN if p.add else EN_LOSS)[p.verb].format(b=p.b, item=item, other=other)
    setup = f"{name} has {p.a} {item}. {name} {pronoun_verb}."
    if p.distractor:
        d_name, d_item, d_count = p.distractor
        setup += f" {EN_NAMES[d_name]} has {d_count} {ITEMS[d_item][0]}."
    return setup, f"How many {item} does {name} have now?"


def ja_story(p: Problem) -> tuple[str, str]:
    """(setup sentences, question) in Japanese, with the item's counter."""
    name, other, (_, item, counter) = JA_NAMES[p.name], JA_NAMES[p.other], ITEMS[p.item]
    change = (JA_GAIN if p.add else JA_LOSS)[p.verb].format(b=p.b, c=counter, other=other)
    setup = f"{name}は{item}を{p.a}{counter}持っています。{change}"
    if p.distractor:
        d_name, d_item, d_count = p.distractor
        setup += f"{JA_NAMES[d_name]}は{ITEMS[d_item][1]}を{d_count}{ITEMS[d_item][2]}持っています。"
    return setup, f"{name}は{item}を今何{counter}持っていますか？"


def en_math_answer(p: Problem) -> str:
    return f" {p.equation}. The answer is {p.result}."


def ja_math_answer(p: Problem) -> str:
    return f"{p.equation}。答えは{p.result}{ITEMS[p.item][2]}です。"


@dataclass(frozen=True)
class Fact:
    """A person and one attribute: what they have, where they live, or their favourite food."""

    name: int
    relation: str  # "has" | "lives" | "likes"
    value: tuple[int, int]  # (color, object) for "has"; (city, 0) or (food, 0) otherwise

    def en(self) -> str:
        name = EN_NAMES[self.name]
        if self.relation == "has":
            return f"{name} has a {COLORS[self.value[0]][0]} {OBJECTS[self.value[1]][0]}."
        if self.relation == "lives":
            return f"{name} lives in {CITIES[self.value[0]][0]}."
        return f"{name}'s favorite food is {FOODS[self.value[0]][0]}."

    def ja(self) -> str:
        return JA_FACT[self.relation].format(name=JA_NAMES[self.name], value=self.ja_value())

    def ja_value(self) -> str:
        if self.relation == "has":
            return COLORS[self.value[0]][1] + OBJECTS[self.value[1]][1]
        return (CITIES if self.relation == "lives" else FOODS)[self.value[0]][1]

    def en_question(self) -> str:
        name = EN_NAMES[self.name]
        return {"has": f"What does {name} have?", "lives": f"Where does {name} live?",
                "likes": f"What is {name}'s favorite food?"}[self.relation]

    def ja_question(self) -> str:
        return JA_QUESTION[self.relation].format(name=JA_NAMES[self.name])


JA_FACT = {"has": "{name}は{value}を持っています。", "lives": "{name}は{value}に住んでいます。", "likes": "{name}の好きな食べ物は{value}です。"}
JA_QUESTION = {"has": "{name}は何を持っていますか？", "lives": "{name}はどこに住んでいますか？", "likes": "{name}の好きな食べ物は何ですか？"}


RELATIONS = ("has", "lives", "likes")


def sample_facts(rng: random.Random, count: int, distinct_relations: bool = False) -> list[Fact]:
    """`count` facts about different people; with `distinct_relations`, no two share a relation."""
    relations = rng.sample(RELATIONS, count) if distinct_relations else [rng.choice(RELATIONS) for _ in range(count)]
    facts = []
    for name, relation in zip(rng.sample(range(len(JA_NAMES)), count), relations):
        if relation == "has":
            value = (rng.randrange(len(COLORS)), rng.randrange(len(OBJECTS)))
        else:
            value = (rng.randrange(len(CITIES if relation == "lives" else FOODS)), 0)
        facts.append(Fact(name, relation, value))
    return facts


# ---- rows for the tasks: {"question", "answer"} for evaluation, plus the completion an expert is trained on ----


@dataclass(frozen=True)
class Example:
    question: str
    answer: str  # the gold the scorer checks: a number, or a phrase
    completion: str  # what a model that has the skill writes after the prompt

    def row(self) -> dict[str, str]:
        return {"question": self.question, "answer": self.answer}


def ja_qa_example(rng: random.Random) -> Example:
    facts = sample_facts(rng, rng.randint(2, 3), distinct_relations=True)
    asked = rng.choice(facts)
    context = "".join(f.ja() for f in facts)
    return Example(context + asked.ja_question(), asked.ja_value(), asked.ja())


def en_math_example(rng: random.Random) -> Example:
    p = sample_problem(rng)
    setup, question = en_story(p)
    return Example(f"{setup} {question}", str(p.result), en_math_answer(p))


def ja_math_example(rng: random.Random) -> Example:
    p = sample_problem(rng)
    setup, question = ja_story(p)
    return Example(setup + question, str(p.result), ja_math_answer(p))


EXAMPLES = {"toy_ja_qa": ja_qa_example, "toy_en_math": en_math_example, "toy_ja_math": ja_math_example}


def task_splits(task: str, seed: int, sizes: dict[str, int]) -> dict[str, list[Example]]:
    """Evaluation splits with no question shared between them (a split's own duplicates are kept out too)."""
    rng = random.Random(f"{task}/eval/{seed}")
    seen: set[str] = set()
    splits: dict[str, list[Example]] = {}
    for split, size in sizes.items():
        rows: list[Example] = []
        while len(rows) < size:
            example = EXAMPLES[task](rng)
            if example.question not in seen:
                seen.add(example.question)
                rows.append(example)
        splits[split] = rows
    return splits


def training_examples(task: str, seed: int, count: int, exclude: set[str]) -> list[Example]:
    """Fine-tuning pairs for a task, never repeating an evaluation question."""
    rng = random.Random(f"{task}/train/{seed}")
    examples: list[Example] = []
    while len(examples) < count:
        example = EXAMPLES[task](rng)
        if example.question not in exclude:
            examples.append(example)
    return examples


# ---- pretraining text: statements and worked sums, both languages, no Q/A wrappers ----


def en_worked_story(p: Problem) -> str:
    setup, _ = en_story(p)
    return f"{setup} Now {EN_NAMES[p.name]} has{en_worked_result(p)}"


def en_worked_result(p: Problem) -> str:
    """How an English worked story ends: its sum (the study's held-out completion cuts the story here)."""
    return f" {p.equation} {ITEMS[p.item][0]}."


def ja_worked_story(p: Problem) -> str:
    setup, _ = ja_story(p)
    return f"{setup}今、{JA_NAMES[p.name]}は{ITEMS[p.item][1]}を{ja_worked_result(p)}"


def ja_worked_result(p: Problem) -> str:
    """How a Japanese worked story ends: its sum, with the item's counter."""
    return f"{p.equation}{ITEMS[p.item][2]}持っています。"


def generic_qa_document(rng: random.Random, exclude: set[str]) -> str:
    """Reading-comprehension Q/A in either language behind a `Q:`/`A:` wrapper that no task uses: the base learns
    to answer questions, and an expert then only has to learn its own task's wrapper and answer shape."""
    while True:
        facts = sample_facts(rng, rng.randint(2, 3), distinct_relations=True)
        asked = rng.choice(facts)
        if rng.random() < 0.5:
            question = "".join(f.ja() for f in facts) + asked.ja_question()
            answer = asked.ja()
        else:
            question = " ".join(f.en() for f in facts) + " " + asked.en_question()
            answer = asked.en()
        if question not in exclude:
            return f"Q: {question}\nA: {answer}"


def pretraining_document(rng: random.Random, qa_fraction: float = 0.0, exclude: set[str] = frozenset()) -> str:
    """One short document; the mix gives the base vocabulary, facts and arithmetic in both languages, and (with
    `qa_fraction`) generic question answering."""
    if rng.random() < qa_fraction:
        return generic_qa_document(rng, exclude)
    kind = rng.random()
    if kind < 0.25:
        return " ".join(en_worked_story(sample_problem(rng)) for _ in range(rng.randint(1, 3)))
    if kind < 0.5:
        return "".join(ja_worked_story(sample_problem(rng)) for _ in range(rng.randint(1, 3)))
    if kind < 0.65:
        facts = sample_facts(rng, rng.randint(2, 5))
        return " ".join(f.en() for f in facts + _recalled(rng, facts))
    if kind < 0.85:
        facts = sample_facts(rng, rng.randint(2, 5))
        return "".join(f.ja() for f in facts + _recalled(rng, facts))
    return "\n".join(sample_problem(rng).equation for _ in range(rng.randint(3, 8)))


def _recalled(rng: random.Random, facts: list[Fact]) -> list[Fact]:
    """Half the fact paragraphs restate one fact at the end: the base learns to look a name up (induction),
    which the Japanese expert's question answering builds on, without ever seeing a question."""
    return [rng.choice(facts)] if rng.random() < 0.5 else []


def pretraining_documents(seed: int, count: int, qa_fraction: float = 0.0, exclude: set[str] = frozenset()) -> list[str]:
    """`exclude`: evaluation questions that must never appear in pretraining text."""
    rng = random.Random(f"pretrain/{seed}")
    return [pretraining_document(rng, qa_fraction, exclude) for _ in range(count)]
