import pytest
import torch

from offramp.data.text import PAD, TREC_CLASSES, UNK, Vocabulary, load_sst2, load_trec
from offramp.errors import ConfigError, DataError

from .conftest import data_dir


def test_vocabulary_by_hand():
    vocab = Vocabulary.build(["the cat", "The dog the"], min_freq=1)
    assert vocab.itos == ["<pad>", "<unk>", "the", "cat", "dog"]
    ids = vocab.encode(["the bird", "dog", ""])
    assert ids.tolist() == [[2, UNK], [4, PAD], [PAD, PAD]] and ids.dtype == torch.long
    assert vocab.encode(["the cat the"], max_length=2).tolist() == [[2, 3]]
    assert len(Vocabulary.build(["a a b"], min_freq=2)) == 3
    with pytest.raises(ConfigError, match="min_freq"):
        Vocabulary.build([], min_freq=0)


def test_readers_name_the_bad_line(tmp_path):
    for name in ("train.tsv", "dev.tsv", "test_labeled.tsv"):
        (tmp_path / name).write_text("sentence\tlabel\ngood film . \t1\n", encoding="utf-8")
    assert load_sst2(tmp_path)["dev"] == (["good film ."], [1])
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nno label here\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"dev.tsv:2"):
        load_sst2(tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_trec(tmp_path)


def test_sst2_as_shipped():
    d = load_sst2(data_dir("sst2"))
    assert [len(d[s][0]) for s in ("train", "dev", "test")] == [67_349, 872, 1_821]
    assert sum(d["dev"][1]) == 444 and not d["dev"][0][0].endswith(" ")


def test_trec_as_shipped():
    d = load_trec(data_dir("trec"))
    assert len(d["train"][0]) == 5_452 and len(d["test"][0]) == 500
    counts = torch.bincount(torch.tensor(d["test"][1]), minlength=6).tolist()
    assert dict(zip(TREC_CLASSES, counts, strict=True)) == {
        "ABBR": 9,
        "DESC": 138,
        "ENTY": 94,
        "HUM": 65,
        "LOC": 81,
        "NUM": 113,
    }


def test_odd_bytes_and_reserved_words(tmp_path):
    (tmp_path / "train_5500.label").write_bytes(
        b"HUM:ind Who wrote \x85Dracula\x85 ?\n\nLOC:city Where ?\n"
    )
    (tmp_path / "TREC_10.label").write_bytes(b"NUM:date When ?\n")
    d = load_trec(tmp_path)
    assert len(d["train"][0]) == 2 and d["train"][1] == [3, 4]  # 0x85 is not a line break
    vocab = Vocabulary.build(["<unk> a", "<pad>"])
    assert vocab.itos == ["<pad>", "<unk>", "a"] and vocab.stoi["<unk>"] == UNK
