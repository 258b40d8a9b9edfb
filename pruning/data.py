"""Calibration and evaluation token windows.

A source is ``pydoc`` (the Python docs text shipped with every CPython, offline), a local text
file or folder (``*.txt``, ``*.md``), or a Hugging Face dataset name (``wikitext2`` and ``c4``
are aliases). Every source is tokenised once into one long stream, which is cut in two halves:
calibration windows come from the first half, evaluation windows from the second, so they never
overlap.

- ``split="eval"``: consecutive windows from the start of the second half. They do not depend on
  the seed, so perplexities of different runs are measured on the same tokens.
- ``split="calib"``: seeded random, non-overlapping windows inside the first half.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from evosparse.pruning.errors import DataSourceError
from evosparse.pruning.hub import hub_offline

Split = Literal["calib", "eval"]

# name -> (datasets path, config, split, text column)
HF_ALIASES: dict[str, tuple[str, str | None, str, str]] = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text"),
    "c4": ("allenai/c4", "en", "validation", "text"),
}
_TEXT_SUFFIXES = (".txt", ".md")
# Streaming sources (c4) are read only up to this many characters: plenty for calibration.
_MAX_HF_CHARS = 4_000_000


def pydoc_text() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def _local_text(path: Path) -> str:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES)
        if not files:
            raise DataSourceError(f"data folder {path} holds no *.txt or *.md files")
    try:
        return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    except OSError as exc:
        raise DataSourceError(f"could not read data source {path}: {exc}") from exc


def _hf_text(name: str) -> str:
    """Text of a Hugging Face dataset; fails fast with a clear message when it cannot be reached."""
    path, config, split, column = HF_ALIASES.get(name, (name, None, "train", "text"))
    offline = hub_offline()
    try:
        import datasets
        import huggingface_hub.constants as hub_constants

        if offline:  # read only the local cache: fail at once instead of retrying the network
            datasets.config.HF_DATASETS_OFFLINE = True
            hub_constants.HF_HUB_OFFLINE = True
        streaming = name == "c4"
        ds = datasets.load_dataset(path, config, split=split, streaming=streaming)
        parts: list[str] = []
        size = 0
        for row in ds:
            text = row.get(column) or ""
            parts.append(text)
            size += len(text)
            if size >= _MAX_HF_CHARS:
                break
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        hint = " (the machine is offline or cannot reach huggingface.co)" if offline else ""
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataSourceError(
            f"data source {name!r}: could not load Hugging Face dataset {path!r}{hint}: {first}. "
            "Use 'pydoc' or a local text file/folder instead."
        ) from exc
    text = "\n\n".join(parts)
    if not text.strip():
        raise DataSourceError(f"data source {name!r}: dataset {path!r} has no text in column {column!r}")
    return text


def source_text(source: str) -> str:
    """The raw text of a data source."""
    if not source or not source.strip():
        raise DataSourceError("data source is empty: use 'pydoc', a text file/folder, or a dataset name")
    if source == "pydoc":
        return pydoc_text()
    path = Path(source).expanduser()
    if path.exists():
        return _local_text(path)
    if source.startswith((".", "/", "~")) or path.suffix.lower() in _TEXT_SUFFIXES:
        raise DataSourceError(f"data source not found: {path}")
    return _hf_text(source)


def _tokenizer_key(tokenizer: object) -> str:
    return f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}"  # type: ignore[arg-type]


_TOKENIZERS: dict[str, object] = {}


@lru_cache(maxsize=8)
def _token_stream(source: str, tok_key: str) -> torch.Tensor:
    tokenizer = _TOKENIZERS[tok_key]
    text = source_text(source)
    # One call over the whole text (fast tokenizers take ~0.5 s for pydoc's 450k characters), so token
    # boundaries never depend on how the text was chunked; verbose=False silences the max-length warning.
    try:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # type: ignore[operator]
    except TypeError:  # minimal tokenizers without the verbose flag
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    return torch.tensor(ids, dtype=torch.long)


def token_stream(source: str, tokenizer: object) -> torch.Tensor:
    """The whole source tokenised once (cached per source and tokenizer)."""
    key = _tokenizer_key(tokenizer)
    _TOKENIZERS[key] = tokenizer
    return _token_stream(source, key)


def calib_offsets(half_len: int, n_windows: int, seq_len: int, seed: int) -> list[int]:
    """Seeded random start offsets of ``n_windows`` non-overlapping windows inside ``half_len`` tokens.

    The free tokens (slack) are spread as random gaps: choose n sorted positions among
    slack + n slots; window i starts at its position minus i plus i * seq_len.
    """
    slack = half_len - n_windows * seq_len
    if slack < 0:
        raise ValueError("not enough tokens")
    rng = random.Random(seed)
    positions = sorted(rng.sample(range(slack + n_windows), n_windows))
    return [p - i + i * seq_len for i, p in enumerate(positions)]


def get_windows(
    source: str, tokenizer: object, n_windows: int, seq_len: int, split: Split = "calib", seed: int = 0
) -> torch.Tensor:
    """``n_windows`` token windows of ``seq_len`` as a LongTensor [n_windows, seq_len]."""
    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
    if n_windows < 1 or seq_len < 2:
        raise ValueError("need at least one window of at least two tokens")
    stream = token_stream(source, tokenizer)
    half = stream.numel() // 2
    part = stream[:half] if split == "calib" else stream[half : 2 * half]
    need = n_windows * seq_len
    if need > part.numel():
        raise DataSourceError(
            f"data source {source!r} has {stream.numel()} tokens; its {split} half ({part.numel()}) is too "
            f"short for {n_windows} windows of {seq_len} tokens ({need}). Use fewer/shorter windows or more text."
        )
    if split == "eval":
        return part[:need].view(n_windows, seq_len).clone()
    offsets = calib_offsets(part.numel(), n_windows, seq_len, seed)
    return torch.stack([part[o : o + seq_len] for o in offsets])
