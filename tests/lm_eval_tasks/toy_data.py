"""Datasets of the custom lm-eval tasks beside this file, read from the JSONL files shipped with them (no hub).

toy_arith.jsonl: the first 120 rows of the toy zoo's toy_en_math test split. toy_qa_choice.jsonl: the first 120
rows of its toy_ja_qa test split, each gold phrase among three other phrases of the same kind (seeded shuffle).
"""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).parent


def _rows(name: str) -> datasets.DatasetDict:
    with (HERE / f"{name}.jsonl").open(encoding="utf-8") as handle:
        return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in handle])})


def arith(**_) -> datasets.DatasetDict:
    return _rows("toy_arith")


def qa_choice(**_) -> datasets.DatasetDict:
    return _rows("toy_qa_choice")
