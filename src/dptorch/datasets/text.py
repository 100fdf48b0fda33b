"""Real English text that every Python installation has: the standard library's docstrings.

The docstrings of the standard library's modules, classes and functions are prose written
by people (with some code mixed in, which is filtered out). They are read from the ``.py``
sources with :mod:`ast`, never by importing the modules, so nothing runs. Sentences are
labelled by the topic of the modules they come from (:data:`TOPICS`), which makes a small
text-classification task; the same prose joined together is a small language-modelling corpus.

The loader checks what it read: a source file missing from this installation (some
distributions strip the sources or ship them compiled only) or a topic left with too few
sentences is reported, every problem at once, with what to install.
"""

from __future__ import annotations

import ast
import functools
import random
import re
import sysconfig
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from dptorch.errors import DPValueError

__all__ = [
    "TOPICS",
    "TextCorpus",
    "build_vocabulary",
    "encode_words",
    "load_stdlib_sentences",
    "stdlib_prose",
    "words",
]

# Topic -> standard-library modules (a file ``name.py`` or a package directory ``name/``).
TOPICS: dict[str, tuple[str, ...]] = {
    "concurrency": ("asyncio", "concurrent", "threading", "multiprocessing", "queue"),
    "internet": ("email", "http", "urllib", "smtplib", "imaplib", "ftplib"),
    "numbers": ("_pydecimal", "fractions", "statistics", "random", "numbers"),
    "files": ("pathlib", "shutil", "tarfile", "zipfile", "tempfile", "glob"),
}
_INSTALL_HINT = (
    "The standard library's .py sources are needed; on Debian/Ubuntu they come with the "
    "python3.X package (apt-get install python3-full), elsewhere with any python.org or pyenv "
    "build. Or pass root= pointing at a CPython Lib/ directory."
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# Lines that are code, doctest or markup rather than prose.
_NOT_PROSE = re.compile(r">>>|\.\.\. |[=_{}\[\]<>|`*#@\\]|\w\(|::|https?:")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?|[.,;:!?]")


@dataclass(frozen=True)
class TextCorpus:
    """Labelled sentences.

    Attributes:
        sentences: the sentences, in a seeded random order.
        labels: ``labels[i]`` indexes ``topics`` for ``sentences[i]``.
        topics: the topic names.
    """

    sentences: list[str]
    labels: list[int]
    topics: list[str]


def _source_files(root: Path, modules: Iterable[str]) -> tuple[list[Path], list[str]]:
    found, missing = [], []
    for name in modules:
        single, package = root / f"{name}.py", root / name
        if single.is_file():
            found.append(single)
        elif package.is_dir() and any(package.rglob("*.py")):
            found.extend(sorted(p for p in package.rglob("*.py") if "test" not in p.parts))
        else:
            missing.append(f"{name}.py or {name}/")
    return found, missing


@functools.lru_cache(maxsize=512)  # parsing is most of the cost; the sources do not change
def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return []  # one unreadable file costs a few sentences; the counts are checked later
    nodes = [tree] + [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    ]
    texts = (ast.get_docstring(n) for n in nodes)
    return [t for t in texts if t]


def _sentences(docstring: str, min_words: int, max_words: int) -> list[str]:
    out = []
    for paragraph in re.split(r"\n\s*\n", docstring):
        lines = paragraph.strip().splitlines()
        if not lines or any(_NOT_PROSE.search(line) for line in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        for sentence in _SENTENCE_END.split(text):
            count = len(sentence.split())
            if min_words <= count <= max_words and sentence[-1] in ".!?":
                out.append(sentence)
    return out


def load_stdlib_sentences(
    *,
    topics: dict[str, Sequence[str]] | None = None,
    root: str | Path | None = None,
    min_words: int = 5,
    max_words: int = 40,
    per_topic: int | None = None,
    min_per_topic: int = 50,
    seed: int = 0,
) -> TextCorpus:
    """Sentences from the standard library's docstrings, labelled by topic.

    Args:
        topics: topic name -> module names (default :data:`TOPICS`).
        root: the standard-library directory (default: this interpreter's).
        min_words: shortest sentence kept, in words.
        max_words: longest sentence kept.
        per_topic: keep this many sentences per topic (default: as many as the smallest topic
            has, so the classes are balanced).
        min_per_topic: refuse to return fewer sentences than this for any topic.
        seed: shuffling seed.

    Raises:
        DPValueError: sources are missing or a topic has too few sentences (all listed).
    """
    topics = dict(topics if topics is not None else TOPICS)
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    by_topic: dict[str, list[str]] = {}
    problems = []
    for topic, modules in topics.items():
        files, missing = _source_files(base, modules)
        if missing:
            problems.append(f"topic {topic!r}: not found under {base}: {', '.join(missing)}")
        seen: dict[str, None] = {}  # ordered set: duplicates (inherited docs) count once
        for path in files:
            for doc in _docstrings(path):
                seen.update(dict.fromkeys(_sentences(doc, min_words, max_words)))
        by_topic[topic] = list(seen)
    smallest = min((len(s) for s in by_topic.values()), default=0)
    take = per_topic if per_topic is not None else smallest
    for topic, sentences in by_topic.items():
        if len(sentences) < max(min_per_topic, take):
            problems.append(
                f"topic {topic!r}: {len(sentences)} sentences read, at least "
                f"{max(min_per_topic, take)} needed"
            )
    if problems:
        raise DPValueError(
            "The standard-library text corpus is incomplete:\n  - "
            + "\n  - ".join(problems)
            + f"\n{_INSTALL_HINT}"
        )
    rng = random.Random(seed)
    pairs = []
    for label, sentences in enumerate(by_topic.values()):
        pairs += [(s, label) for s in rng.sample(sentences, take)]
    rng.shuffle(pairs)
    return TextCorpus([s for s, _ in pairs], [y for _, y in pairs], list(by_topic))


def stdlib_prose(*, min_chars: int = 20_000, root: str | Path | None = None) -> str:
    """All prose sentences of :data:`TOPICS`' docstrings, one per line (a language corpus).

    Raises:
        DPValueError: fewer than ``min_chars`` characters could be read.
    """
    corpus = load_stdlib_sentences(root=root, per_topic=None, min_per_topic=1, seed=0)
    text = "\n".join(sorted(corpus.sentences))  # sorted: the same text on every run
    if len(text) < min_chars:
        raise DPValueError(
            f"Only {len(text)} characters of standard-library prose were read under "
            f"{root or sysconfig.get_paths()['stdlib']} (at least {min_chars} needed). "
            + _INSTALL_HINT
        )
    return text


def words(text: str) -> list[str]:
    """Lower-case words and punctuation marks: ``"It's done."`` -> ``["it's", "done", "."]``."""
    return _WORD.findall(text.lower())


def build_vocabulary(texts: Iterable[str], size: int) -> dict[str, int]:
    """The ``size - 2`` most frequent words, numbered from 2; 0 is padding, 1 unknown.

    Build it from training texts only, so the test split adds no word to it. Privacy: the
    vocabulary is a function of the training data and is NOT private; for a formal
    guarantee build it from public text or with a DP vocabulary mechanism.
    """
    counts = Counter(w for text in texts for w in words(text))
    ranked = sorted(counts, key=lambda w: (-counts[w], w))[: max(size - 2, 0)]
    return {w: i + 2 for i, w in enumerate(ranked)}


def encode_words(texts: Sequence[str], vocabulary: dict[str, int], length: int) -> Tensor:
    """``[N, length]`` int64 word ids, cut or padded with 0 at the end."""
    out = torch.zeros(len(texts), length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [vocabulary.get(w, 1) for w in words(text)][:length]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out
