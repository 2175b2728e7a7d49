"""Embedded text dataset ``topics``: the English utterances of chatterbot-corpus, labelled by topic.

chatterbot-corpus (installed as a package, no download) ships one YAML file per topic under
``chatterbot_corpus/data/english/`` (ai, botprofile, coding, ... trivia: 21 files), each a list of short
conversations. Every utterance (question or answer) becomes one example: ``text`` is the utterance,
``label`` (ClassLabel) its topic file. Utterances repeated inside a topic are kept once; an utterance
that occurs in two or more topics is dropped, since its label would be ambiguous. The result is about
1,900 real English sentences, heavily imbalanced across topics (trivia has hundreds, health a handful),
which is part of what label-skewed federation (``scheme: dirichlet``) stresses.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import datasets
import yaml


def corpus_dir() -> Path:
    """The folder of chatterbot-corpus's English YAML files."""
    try:
        import chatterbot_corpus
    except ImportError as err:
        raise RuntimeError("the embedded 'topics' dataset needs the chatterbot-corpus package; "
                           "pip install chatterbot-corpus") from err
    return Path(chatterbot_corpus.__file__).resolve().parent / "data" / "english"


def _utterances(path: Path) -> list[str]:
    """Distinct utterances of one topic file, in order of first appearance."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    seen: dict[str, None] = {}
    for conversation in data.get("conversations", []):
        for utterance in conversation:
            if isinstance(utterance, str) and utterance.strip():
                seen.setdefault(" ".join(utterance.split()), None)
    return list(seen)


def build_topics(*, min_examples: int = 1) -> datasets.DatasetDict:
    """Build ``topics`` as a ``DatasetDict`` with one ``train`` split (columns text, label).

    Args:
        min_examples: Topics with fewer distinct, unambiguous utterances are left out (1 keeps all 21).
    """
    files = sorted(corpus_dir().glob("*.yml"))
    if not files:
        raise RuntimeError(f"no topic files (*.yml) found in {corpus_dir()}")
    per_topic = {f.stem: _utterances(f) for f in files}
    topics_of: dict[str, set[str]] = defaultdict(set)
    for topic, texts in per_topic.items():
        for text in texts:
            topics_of[text].add(topic)
    kept = {t: [x for x in texts if len(topics_of[x]) == 1] for t, texts in per_topic.items()}
    names = [t for t, texts in kept.items() if len(texts) >= min_examples]
    texts = [x for t in names for x in kept[t]]
    labels = [k for k, t in enumerate(names) for _ in kept[t]]
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    train = datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)
    return datasets.DatasetDict({"train": train})
