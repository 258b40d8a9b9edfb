import pytest
import torch
from evosparse.pruning.data import calib_offsets, get_windows, token_stream
from evosparse.pruning.errors import DataSourceError


class CharTokenizer:
    """One token per character: makes window positions easy to check."""

    name_or_path = "chars"

    def __len__(self) -> int:
        return 256

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) % 256 for c in text]}


def _is_slice(stream: torch.Tensor, window: torch.Tensor, lo: int, hi: int) -> bool:
    t = window.numel()
    return any(torch.equal(stream[o : o + t], window) for o in range(lo, hi - t + 1))


def test_pydoc_calib_and_eval_come_from_separate_halves():
    tok = CharTokenizer()
    stream = token_stream("pydoc", tok)
    half = stream.numel() // 2
    calib = get_windows("pydoc", tok, 6, 64, "calib", seed=3)
    evalw = get_windows("pydoc", tok, 6, 64, "eval", seed=3)
    assert calib.shape == evalw.shape == (6, 64) and calib.dtype == torch.long
    # eval: consecutive windows from the start of the second half
    assert torch.equal(evalw.flatten(), stream[half : half + 6 * 64])
    # calib: exactly the seeded offsets, inside the first half, not overlapping
    offsets = calib_offsets(half, 6, 64, seed=3)
    assert all(b - a >= 64 for a, b in zip(offsets, offsets[1:], strict=False))
    assert offsets[-1] + 64 <= half
    for o, w in zip(offsets, calib, strict=True):
        assert torch.equal(stream[o : o + 64], w)


def test_windows_are_deterministic_per_seed_and_eval_ignores_seed():
    tok = CharTokenizer()
    a = get_windows("pydoc", tok, 8, 32, "calib", seed=1)
    b = get_windows("pydoc", tok, 8, 32, "calib", seed=1)
    c = get_windows("pydoc", tok, 8, 32, "calib", seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(get_windows("pydoc", tok, 4, 32, "eval", seed=1), get_windows("pydoc", tok, 4, 32, "eval", seed=9))


def test_calib_offsets_never_overlap_even_when_tight():
    for seed in range(20):
        offs = calib_offsets(1000, 9, 111, seed)  # slack of one token
        assert offs == sorted(offs) and offs[-1] + 111 <= 1000
        assert all(b - a >= 111 for a, b in zip(offs, offs[1:], strict=False))


def test_local_file_and_folder(tmp_path):
    tok = CharTokenizer()
    (tmp_path / "a.txt").write_text("a" * 500)
    (tmp_path / "b.md").write_text("b" * 500)
    (tmp_path / "skip.bin").write_text("c" * 5000)
    folder = get_windows(str(tmp_path), tok, 2, 100, "eval")
    assert folder.shape == (2, 100)
    stream = token_stream(str(tmp_path), tok)
    assert stream.numel() == 1002 and ord("c") not in stream.tolist()  # a + "\n\n" + b, no .bin
    single = get_windows(str(tmp_path / "a.txt"), tok, 2, 100, "calib", seed=0)
    assert set(single.flatten().tolist()) == {ord("a")}


def test_too_little_text_and_missing_sources_raise_clear_errors(tmp_path):
    tok = CharTokenizer()
    (tmp_path / "small.txt").write_text("x" * 300)
    with pytest.raises(DataSourceError, match="too short"):
        get_windows(str(tmp_path / "small.txt"), tok, 2, 100, "calib")
    with pytest.raises(DataSourceError, match="not found"):
        get_windows(str(tmp_path / "nope.txt"), tok, 1, 10, "eval")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="no \\*.txt"):
        get_windows(str(tmp_path / "empty"), tok, 1, 10, "eval")


def test_unreachable_hf_dataset_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataSourceError, match="wikitext"):
        get_windows("wikitext2", CharTokenizer(), 1, 10, "eval")
