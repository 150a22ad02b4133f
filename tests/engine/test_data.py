"""Token data: split, seeded windows, clear errors for short corpora."""

import pytest
import torch

from worker.engine.data import DataError, TokenData, load_text_data, min_tokens
from worker.engine.tokenizers import ByteTokenizer


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_empty_corpus_raises_with_counts() -> None:
    with pytest.raises(DataError, match=r"corpus is empty; seq_len 16 needs at least \d+"):
        load_text_data("", ByteTokenizer(), seq_len=16, val_fraction=0.1)


def test_short_corpus_message_says_have_and_need() -> None:
    need = min_tokens(128, 0.1)
    with pytest.raises(DataError) as err:
        load_text_data("x" * 120, ByteTokenizer(), seq_len=128, val_fraction=0.1)
    msg = str(err.value)
    assert "corpus has 120 tokens" in msg
    assert f"seq_len 128 needs at least {need} (train + 10% validation)" in msg


def test_min_tokens_is_exactly_enough() -> None:
    for seq_len, frac in [(8, 0.1), (128, 0.1), (5, 0.3), (16, 0.05)]:
        need = min_tokens(seq_len, frac)
        TokenData(torch.arange(need), seq_len, frac)
        with pytest.raises(DataError):
            TokenData(torch.arange(need - 1), seq_len, frac)


def test_split_is_tail_and_sizes_add_up() -> None:
    data = TokenData(torch.arange(1000), seq_len=8, val_fraction=0.1)
    assert (data.n_train, data.n_val) == (900, 100)


def test_batch_shapes_and_shift() -> None:
    data = TokenData(torch.arange(1000), seq_len=8, val_fraction=0.1)
    x, y = data.batch("train", 5, _gen())
    assert x.shape == y.shape == (5, 8)
    assert x.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y[:, -1], x[:, -1] + 1)  # consecutive tokens of arange


def test_same_generator_state_same_batch() -> None:
    data = TokenData(torch.arange(1000), seq_len=8, val_fraction=0.1)
    a = data.batch("train", 4, _gen(3))
    b = data.batch("train", 4, _gen(3))
    c = data.batch("train", 4, _gen(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_windows_never_cross_the_split() -> None:
    data = TokenData(torch.arange(300), seq_len=10, val_fraction=0.2)
    g = _gen()
    for _ in range(20):
        x, y = data.batch("val", 64, g)
        assert int(x.min()) >= data.n_train and int(y.max()) < 300
        x, y = data.batch("train", 64, g)
        assert int(y.max()) < data.n_train  # targets too: no validation token leaks into training


def test_load_text_data_tokenizes() -> None:
    text = "训练 " * 200
    data = load_text_data(text, ByteTokenizer(), seq_len=16, val_fraction=0.1)
    assert data.n_train + data.n_val == len(text.encode("utf-8"))


def test_bad_split_name() -> None:
    data = TokenData(torch.arange(100), seq_len=4, val_fraction=0.1)
    with pytest.raises(ValueError):
        data.batch("test", 2, _gen())  # type: ignore[arg-type]
