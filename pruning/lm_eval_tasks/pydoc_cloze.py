"""pydoc_cloze: a multiple-choice task built offline from the Python documentation CPython ships.

Each item is one sentence of the ``pydoc_data.topics`` text (the context) and four candidate next
sentences: the one that really follows it, and three that follow other sentences elsewhere in the
documentation, chosen closest in length so length alone does not give the answer away. A language
model that has learnt English and a little Python picks the true continuation well above the 25 %
of chance. The sentences come from the second part of the text (from 55 % of its characters on):
evosparse calibrates on the first half of the same text, so no item overlaps a calibration window.

lm-eval loads it through ``custom_dataset`` (see pydoc_cloze.yaml), so nothing is downloaded.
The items depend on the CPython version's documentation; the task reports how many it built.
"""

from __future__ import annotations

import random
import re
from typing import Any

START_FRACTION = 0.55  # past the calibration half, with a margin for tokenizers' token/char ratio
CHOICES = 4
SEED = 1234
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\"'])\. (?=[A-Z])")


def _sentence_pairs(text: str) -> list[tuple[str, str]]:
    """(sentence, the sentence that follows it) inside one prose paragraph, both of a plain length."""
    pairs = []
    for para in re.split(r"\n\s*\n", text):
        if para.startswith("   ") or "***" in para or "===" in para:  # code, grammar and headings
            continue
        sentences = [s.strip() for s in _SENTENCE_END.split(" ".join(para.split()))]
        for a, b in zip(sentences, sentences[1:], strict=False):
            if 40 <= len(a) <= 240 and 30 <= len(b) <= 200:
                pairs.append((a.rstrip(".") + ".", b.rstrip(".") + "."))
    return pairs


def build_docs(text: str | None = None, seed: int = SEED) -> list[dict[str, Any]]:
    """The task's items: ``{"context", "choices", "label"}``, deterministic for a text and seed."""
    if text is None:
        from evosparse.pruning.data import pydoc_text

        text = pydoc_text()
    pairs = _sentence_pairs(text[int(len(text) * START_FRACTION):])
    rng = random.Random(seed)
    endings = [b for _, b in pairs]
    docs = []
    for i, (context, true_next) in enumerate(pairs):
        others = sorted((abs(len(e) - len(true_next)), j) for j, e in enumerate(endings)
                        if j != i and e != true_next)
        pool = [endings[j] for _, j in others[: 4 * CHOICES]]
        distractors = rng.sample(pool, CHOICES - 1)
        label = rng.randrange(CHOICES)
        choices = distractors[:label] + [true_next] + distractors[label:]
        docs.append({"context": context, "choices": choices, "label": label})
    return docs


def load(**_kwargs: Any) -> dict[str, Any]:
    """lm-eval's ``custom_dataset`` hook: a DatasetDict with the items as its ``test`` split."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(build_docs())})
