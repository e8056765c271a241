"""Text classification data, offline: SST-2 and TREC files as shipped, and a word vocabulary.

Readers return ``(sentences, labels)`` per split; :class:`Vocabulary` turns sentences into token
ids ``(N, T)`` right-padded with 0 (id 1 is the unknown word), the input the library's recurrent
and transformer text models take. For a pretrained encoder use its own tokenizer instead
(:func:`offramp.models.hf.encode`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from offramp.errors import ConfigError, DataError

__all__ = ["PAD", "TREC_CLASSES", "UNK", "Vocabulary", "load_sst2", "load_trec", "words"]

#: Token id of padding and of words outside the vocabulary.
PAD, UNK = 0, 1

#: TREC's six coarse question classes, in label order.
TREC_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


def words(text: str) -> list[str]:
    """Lower-cased whitespace tokens (SST-2 and TREC come tokenized)."""
    return text.lower().split()


def _lines(text: str) -> list[str]:
    """Lines split at newlines only (``str.splitlines`` also splits at U+0085, which a Latin-1
    byte 0x85 decodes to)."""
    return [line.rstrip("\r") for line in text.split("\n")]


def _need(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"{path} not found: point the loader at the dataset's folder")
    return path


def load_sst2(root: str | Path) -> dict[str, tuple[list[str], list[int]]]:
    """GLUE SST-2 from ``root`` (``train.tsv``, ``dev.tsv``, ``test_labeled.tsv``: a header
    ``sentence<TAB>label``, labels 0/1).

    Returns:
        ``{"train": …, "dev": …, "test": …}``, each ``(sentences, labels)``.

    Raises:
        DataError: a file is missing or a line is malformed (named with its line number).
    """
    out = {}
    for split, name in (("train", "train.tsv"), ("dev", "dev.tsv"), ("test", "test_labeled.tsv")):
        path = _need(Path(root) / name)
        texts, labels = [], []
        for n, line in enumerate(_lines(path.read_text(encoding="utf-8"))[1:], start=2):
            if not line.strip():
                continue
            text, sep, label = line.rpartition("\t")
            if not sep or label.strip() not in ("0", "1"):
                raise DataError(f"{path}:{n}: expected 'sentence<TAB>0|1', got {line[:80]!r}")
            texts.append(text.strip())
            labels.append(int(label))
        out[split] = (texts, labels)
    return out


def load_trec(root: str | Path) -> dict[str, tuple[list[str], list[int]]]:
    """TREC question classification from ``root`` (``train_5500.label``, ``TREC_10.label``,
    Latin-1, ``COARSE:fine question``), with the six coarse classes of :data:`TREC_CLASSES`.

    Returns:
        ``{"train": …, "test": …}``, each ``(questions, labels)``.
    """
    out = {}
    for split, name in (("train", "train_5500.label"), ("test", "TREC_10.label")):
        path = _need(Path(root) / name)
        texts, labels = [], []
        for n, line in enumerate(_lines(path.read_text(encoding="latin-1")), start=1):
            if not line.strip():
                continue
            label, _, text = line.partition(" ")
            coarse = label.split(":")[0]
            if coarse not in TREC_CLASSES or not text:
                raise DataError(f"{path}:{n}: expected 'COARSE:fine question', got {line[:80]!r}")
            texts.append(text.strip())
            labels.append(TREC_CLASSES.index(coarse))
        out[split] = (texts, labels)
    return out


@dataclass
class Vocabulary:
    """Words to ids: 0 is padding, 1 an unknown word, then the known words by frequency.

    Example:
        >>> vocab = Vocabulary.build(["a b b", "b c"])
        >>> vocab.encode(["b a", "c"]).tolist()
        [[2, 3], [4, 0]]
    """

    itos: list[str] = field(default_factory=lambda: ["<pad>", "<unk>"])

    def __post_init__(self) -> None:
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    @classmethod
    def build(
        cls, texts: Iterable[str], *, min_freq: int = 1, max_size: int | None = None
    ) -> Vocabulary:
        """The words of ``texts`` seen at least ``min_freq`` times, most frequent first (ties
        in first-seen order), at most ``max_size`` of them."""
        if min_freq < 1:
            raise ConfigError(f"min_freq must be ≥ 1, got {min_freq}")
        counts = Counter(w for t in texts for w in words(t))
        reserved = {"<pad>", "<unk>"}  # a literal one in the text stays an ordinary word's id
        kept = [w for w, c in counts.most_common() if c >= min_freq and w not in reserved]
        kept = kept[:max_size]
        return cls(["<pad>", "<unk>", *kept])

    def encode(self, texts: Sequence[str], *, max_length: int | None = None) -> Tensor:
        """Token ids ``(N, T)`` (int64), right-padded with :data:`PAD` to the longest text (at
        least one token; at most ``max_length``)."""
        rows = [[self.stoi.get(w, UNK) for w in words(t)][:max_length] for t in texts]
        t = max([1, *(len(r) for r in rows)])
        out = torch.full((len(rows), t), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out
