"""Pre-tokenised corpora: one memory-mapped token file per split plus a document index.

Layout of a cache entry, ``<cache_dir>/<key>/`` with `key` a hash of the corpus,
the tokenizer model and this format's version:

    train.bin        (n_tokens,) uint16 (vocabulary <= 65536) or uint32: every
                     document's tokens followed by EOS, documents back to back
    train.idx.npy    (n_docs + 1,) int64 offsets: document d is bin[idx[d]:idx[d+1]]
    validation.bin, validation.idx.npy   the same for the held-out documents
    meta.json        counts, dtype, corpus and tokenizer; written last

An entry is built in a temporary folder (``<key>.tmp-HOST-PID``) and renamed into
place, so a reader never sees a half-written one. A build that fails (a full disk) removes
its folder; one that was killed leaves it, and the next run on that host removes it once
its owner is gone (see :func:`fmtrain.leftovers.remove_stale`). Under torch.distributed, rank 0 builds while the
others wait at a barrier; if a node still does not see the entry afterwards (a
node-local cache dir), that node's local rank 0 builds its own copy. For corpora
whose build takes longer than the process-group timeout, build beforehand:
``python -m fmtrain.data.tokens --cache-dir DIR --tokenizer MODEL [corpus options]``.
"""

from __future__ import annotations

import argparse
import array
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from fmtrain.data.corpus import SPLITS, Corpus, CorpusError
from fmtrain.data.tokenizer import Tokenizer, load_tokenizer
from fmtrain.errors import EXIT_USAGE, no_space, report
from fmtrain.leftovers import remove_stale, temp_name

FORMAT_VERSION = 1
_BATCH_CHARS = 16_000_000  # text handed to the tokenizer's threads at once
_PROGRESS_SECONDS = 10.0


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class TokenData:
    """A tokenised split: the token stream and where each document starts.

    Attributes:
        tokens: (n_tokens,) uint16/uint32, documents back to back, each ending in EOS.
        offsets: (n_docs + 1,) int64, document d is tokens[offsets[d]:offsets[d+1]].
    """

    tokens: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[0] != 0:
            raise ValueError("offsets must be 1-D and start at 0")
        if self.offsets[-1] != len(self.tokens):
            raise ValueError(f"offsets end at {self.offsets[-1]} but there are {len(self.tokens)} tokens")

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    def document(self, d: int) -> np.ndarray:
        return self.tokens[self.offsets[d]:self.offsets[d + 1]]

    @classmethod
    def from_documents(cls, docs: Iterable[Sequence[int]], eos_id: int, vocab_size: int = 1 << 16) -> "TokenData":
        """In memory, from documents of token ids (EOS appended to each)."""
        dtype = token_dtype(vocab_size)
        arrays = [np.append(np.asarray(d, dtype=dtype), np.array([eos_id], dtype=dtype)) for d in docs]
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
        return cls(tokens, offsets)

    @classmethod
    def open(cls, folder: str | Path, split: str) -> "TokenData":
        """Memory-map one split of a built cache entry."""
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        offsets = np.load(folder / f"{split}.idx.npy")
        n = int(offsets[-1])
        # np.memmap refuses empty files; an empty split is an empty array.
        tokens = (np.memmap(folder / f"{split}.bin", dtype=dtype, mode="r", shape=(n,))
                  if n else np.zeros(0, dtype=dtype))
        return cls(tokens, offsets)


# ------------------------------------------------------------------ building

def cache_key(corpus: Corpus, tokenizer: Tokenizer) -> str:
    """Hash of the corpus (settings and files), the tokenizer model's bytes and the format version."""
    h = hashlib.sha256()
    h.update(f"fmtrain-tokens-v{FORMAT_VERSION}\n".encode())
    h.update(corpus.fingerprint().encode())
    h.update(hashlib.sha256(Path(tokenizer.path).read_bytes()).digest())
    h.update(getattr(tokenizer, "cache_extra", b""))  # a Hugging Face tokenizer's EOS is in its config
    return h.hexdigest()[:20]


class _SplitWriter:
    """Appends documents to `<split>.bin` and remembers their offsets.

    Everything is written through Python's file objects, whose failed writes carry the OS's errno
    (ENOSPC: a full disk); numpy's ``tofile`` reports one as bare counts ("7793 requested and 2825
    written").
    """

    def __init__(self, folder: Path, split: str, dtype: np.dtype):
        self.folder, self.split, self.dtype = folder, split, dtype
        self.file = open(folder / f"{split}.bin", "wb")
        self.offsets = array.array("q", [0])  # 8 bytes a document, however many there are

    def add(self, ids: list[int], eos_id: int) -> None:
        arr = np.empty(len(ids) + 1, dtype=self.dtype)
        arr[:-1] = ids
        arr[-1] = eos_id
        self.file.write(arr.data)
        self.offsets.append(self.offsets[-1] + len(arr))

    def close(self) -> dict:
        self.file.close()
        with open(self.folder / f"{self.split}.idx.npy", "wb") as fh:
            np.save(_Sink(fh), np.frombuffer(self.offsets, dtype=np.int64))
        return dict(n_docs=len(self.offsets) - 1, n_tokens=self.offsets[-1])

    def abort(self) -> None:
        """Close after a failure; the buffered rest cannot be written either (the folder is removed)."""
        try:
            self.file.close()
        except OSError:
            pass


class _Sink:
    """A file that numpy writes to through ``write`` (not C's fwrite, whose short write has no errno)."""

    def __init__(self, fh):
        self.write = fh.write


class _Progress:
    """Prints a line every few seconds while tokenising (to stderr, one line each: log-friendly)."""

    def __init__(self, label: str, total_bytes: int | None, enabled: bool):
        self.label, self.total, self.enabled = label, total_bytes, enabled
        self.start = self.last = time.time()
        self.bytes = self.docs = self.tokens = 0

    def update(self, n_bytes: int, n_docs: int, n_tokens: int, final: bool = False) -> None:
        self.bytes += n_bytes
        self.docs += n_docs
        self.tokens += n_tokens
        now = time.time()
        if self.enabled and (final or now - self.last >= _PROGRESS_SECONDS):
            self.last = now
            rate = self.bytes / max(now - self.start, 1e-9) / 1e6
            share = f" of ~{self.total / 1e6:.1f}" if self.total else ""
            print(f"[fmtrain.data] {'tokenised' if final else 'tokenising'} {self.label}: "
                  f"{self.bytes / 1e6:.1f}{share} MB, {self.docs} docs, {self.tokens / 1e6:.2f}M tokens, "
                  f"{rate:.1f} MB/s, {now - self.start:.0f} s", file=sys.stderr, flush=True)


def build_tokens(corpus: Corpus, tokenizer: Tokenizer, folder: str | Path, *, progress: bool = True,
                 num_threads: int | None = None) -> dict:
    """Tokenise every document of `corpus` into `folder` (created); returns the metadata.

    Documents are encoded in batches of about 16 MB of text, in parallel, and
    appended to the split's file, so memory stays flat however large the corpus.
    """
    if tokenizer.eos_id is None:
        raise ValueError(f"tokenizer {tokenizer.path} has no EOS piece, which separates documents")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    writers: dict[str, _SplitWriter] = {}
    try:
        for s in SPLITS:
            writers[s] = _SplitWriter(folder, s, dtype)
        return _tokenise_into(corpus, tokenizer, folder, writers, dtype, progress, num_threads)
    except BaseException:
        for w in writers.values():  # else their buffers are flushed again when collected, and fail again
            w.abort()
        raise


def _tokenise_into(corpus: Corpus, tokenizer: Tokenizer, folder: Path, writers: dict[str, "_SplitWriter"],
                   dtype: np.dtype, progress: bool, num_threads: int | None) -> dict:
    label = corpus.name if corpus.source == "hub" else corpus.source
    bar = _Progress(label, corpus.size_hint(), progress)

    def flush(batch: list[tuple[str, str]]) -> None:
        encoded = tokenizer.encode_batch([t for _, t in batch], num_threads=num_threads)
        for (split, _), ids in zip(batch, encoded):
            writers[split].add(ids, tokenizer.eos_id)
        bar.update(sum(len(t.encode("utf-8", errors="surrogatepass")) for _, t in batch),
                   len(batch), sum(len(ids) + 1 for ids in encoded))

    batch: list[tuple[str, str]] = []
    chars = 0
    for split, text in corpus.documents():
        batch.append((split, text))
        chars += len(text)
        if chars >= _BATCH_CHARS:
            flush(batch)
            batch, chars = [], 0
    if batch:
        flush(batch)
    counts = {s: w.close() for s, w in writers.items()}
    bar.update(0, 0, 0, final=True)
    if counts["train"]["n_tokens"] == 0:
        raise CorpusError(f"corpus {corpus.describe()} has no training text "
                          f"({counts['validation']['n_docs']} documents held out, none left to train on)")
    meta = dict(format_version=FORMAT_VERSION, dtype=dtype.name, vocab_size=tokenizer.vocab_size,
                eos_id=tokenizer.eos_id, tokenizer=str(tokenizer.path), corpus=corpus.describe(),
                splits=counts, text_bytes=bar.bytes, seconds=round(time.time() - bar.start, 1))
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# What a killed build leaves in the cache folder: an entry's temporary folder, and a tokenizer's
# temporary files (in tokenizers/). The owner is HOST-PID (fmtrain.leftovers.temp_name).
_ENTRY_TMP = re.compile(r"[0-9a-f]{20}\.tmp-(?P<owner>.+)")
_TOKENIZER_TMP = re.compile(r"[0-9a-f]{20}\.tmp-(?P<owner>.+?)\.(model|json)")


def _no_space(exc: BaseException, what: str, cache_dir: Path, where: Path) -> CorpusError | None:
    if isinstance(exc, CorpusError) or not no_space(exc, where):
        return None
    return CorpusError(f"no space left on device while writing {what} under {cache_dir}; free space there or "
                       "set data.cache_dir elsewhere")


def _build_into_place(corpus: Corpus, tokenizer: Tokenizer, target: Path, progress: bool) -> None:
    """Build in a temporary sibling folder, then rename it to `target` (atomic; first one wins)."""
    target.parent.mkdir(parents=True, exist_ok=True)  # a killed build's leftovers: removed by cached_tokens
    tmp = target.parent / temp_name(f"{target.name}.tmp-")
    shutil.rmtree(tmp, ignore_errors=True)  # this process's own, from a build that failed half-way
    try:
        tmp.mkdir()
        build_tokens(corpus, tokenizer, tmp, progress=progress)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _complete(target):  # not someone else's finished copy: a real failure
                raise
    except Exception as exc:
        full = _no_space(exc, "the token cache", target.parent, tmp)  # looked at before the cleanup frees space
        if full is None:
            raise
        raise full from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _complete(folder: Path) -> bool:
    return (folder / "meta.json").is_file()


def damage(folder: Path) -> str | None:
    """What is wrong with a built entry's files (a size that differs from what meta.json counts), or None.

    A truncated or extended ``.bin`` would otherwise surface as a raw mmap error, or as
    documents silently cut short.
    """
    try:
        meta = json.loads((folder / "meta.json").read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split, counts in meta["splits"].items():
            bin_path, idx_path = folder / f"{split}.bin", folder / f"{split}.idx.npy"
            want = counts["n_tokens"] * itemsize
            if not bin_path.is_file() or bin_path.stat().st_size != want:
                got = bin_path.stat().st_size if bin_path.is_file() else "no"
                return f"{bin_path} has {got} bytes, {want} were written"
            offsets = np.load(idx_path, mmap_mode="r")
            if offsets.shape != (counts["n_docs"] + 1,) or int(offsets[-1]) != counts["n_tokens"]:
                return f"{idx_path} does not index {counts['n_docs']} documents of {counts['n_tokens']} tokens"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # unreadable meta.json or index
        return f"{folder}: {type(exc).__name__}: {exc}"
    return None


def _usable(folder: Path) -> bool:
    """A complete entry whose files are intact; a damaged one is removed (it is then rebuilt)."""
    if not _complete(folder):
        return False
    problem = damage(folder)
    if problem is None:
        return True
    print(f"warning: the token cache {folder} is damaged ({problem}); rebuilding it", file=sys.stderr,
          flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    return False


def cached_tokens(corpus: Corpus | str, tokenizer: Tokenizer | str | Path, cache_dir: str | Path, *,
                  progress: bool = True, rebuild: bool = False) -> tuple[Path, dict[str, TokenData]]:
    """The tokenised corpus, built once and reused: (entry folder, {"train": ..., "validation": ...}).

    Safe to call from every rank at once: under torch.distributed rank 0 builds
    and the others wait at a barrier (see the module docstring).
    """
    corpus = Corpus.parse(corpus)
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    folder = Path(cache_dir) / cache_key(corpus, tokenizer)
    if _rank() == 0:  # also when nothing is built: a killed build of another corpus left its folder
        remove_stale(cache_dir, _ENTRY_TMP, "a token cache build")
    if rebuild and _rank() == 0 and folder.exists():
        shutil.rmtree(folder)
    # Rank 0 checks the entry (and removes a damaged one); the others only look for it afterwards.
    _build_once(lambda: _build_into_place(corpus, tokenizer, folder, progress),
                lambda: _usable(folder) if _rank() == 0 else _complete(folder))
    problem = damage(folder)
    if problem is not None:  # damaged since (another process), or on a node-local copy
        raise CorpusError(f"the token cache {folder} is damaged: {problem}. Delete {folder} (it is rebuilt "
                          "from the corpus on the next start)")
    return folder, {s: TokenData.open(folder, s) for s in SPLITS}


def cached_tokenizer(corpus: Corpus | str, cache_dir: str | Path, *, vocab_size: int, model_type: str = "bpe",
                     max_train_bytes: int = 200_000_000) -> Tokenizer:
    """A tokenizer trained on the corpus's training documents, once, and kept in the cache.

    Saved as ``<cache_dir>/tokenizers/<key>.model`` (and ``.json``), `key` a hash
    of the corpus and the settings. It always has MASK, so one tokenizer serves
    both objectives. Safe to call from every rank (rank 0 trains).
    """
    from fmtrain.data.tokenizer import model_paths, train_tokenizer

    corpus = Corpus.parse(corpus)
    h = hashlib.sha256(f"{corpus.fingerprint()}|{vocab_size}|{model_type}|{max_train_bytes}".encode())
    model, settings = model_paths(Path(cache_dir) / "tokenizers" / h.hexdigest()[:20])

    def build() -> None:
        print(f"[fmtrain.data] training a {vocab_size}-piece {model_type} tokenizer on the corpus (once: it is "
              f"cached as {model})", flush=True)
        model.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(model.parent, _TOKENIZER_TMP, "a tokenizer training")
        tmp_model, tmp_settings = model_paths(model.parent / temp_name(f"{model.stem}.tmp-"))
        texts = (text for split, text in corpus.documents() if split == "train")
        try:
            train_tokenizer(texts, tmp_model, vocab_size=vocab_size, model_type=model_type,
                            max_train_bytes=max_train_bytes, corpus=corpus.describe())
            os.replace(tmp_settings, settings)
            os.replace(tmp_model, model)  # last: the .model's presence means complete
        except Exception as exc:
            full = _no_space(exc, "the tokenizer", Path(cache_dir), model.parent)
            for path in (tmp_model, tmp_settings):
                path.unlink(missing_ok=True)
            if full is None:
                raise
            raise full from None

    _build_once(build, model.is_file)
    return load_tokenizer(model, vocab_size=vocab_size)


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _build_once(build: Callable[[], None], exists: Callable[[], bool]) -> None:
    """Run `build` on rank 0 (then on each node's local rank 0 that still lacks it), the rest waiting."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        if not exists():
            build()
        return
    _build_where(build, dist.get_rank() == 0 and not exists())
    # A node-local cache dir: nodes other than rank 0's build their own copy.
    missing = not exists()
    if _any_rank(missing):
        from ..parallel.groups import local_rank

        _build_where(build, missing and local_rank() == 0)
    if not exists():
        raise RuntimeError("the data cache is still missing on this rank after building; "
                           "is LOCAL_RANK set correctly?")


def _build_where(build: Callable[[], None], here: bool) -> None:
    """`build` on the ranks where `here`; every rank returns, or raises if any build failed."""
    error: BaseException | None = None
    if here:
        try:
            build()
        except BaseException as err:  # still reach the collective, or the other ranks would hang
            error = err
    failed = _any_rank(error is not None)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError("another rank failed to build the data cache (see its log)")


def _any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any (an all-reduce, which is also a barrier)."""
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ------------------------------------------------------------------ command line

def main(argv: Sequence[str] | None = None) -> int:
    from fmtrain.data.corpus import add_corpus_arguments, corpus_from_arguments

    p = argparse.ArgumentParser(prog="python -m fmtrain.data.tokens",
                                description="Tokenise a corpus into the cache ahead of training.")
    p.add_argument("--tokenizer", required=True, help="the tokenizer's .model file")
    p.add_argument("--cache-dir", required=True, help="the data cache folder the training run will use")
    p.add_argument("--rebuild", action="store_true", help="discard an existing entry and build again")
    add_corpus_arguments(p)
    args = p.parse_args(argv)
    try:
        folder, data = cached_tokens(corpus_from_arguments(args), args.tokenizer, args.cache_dir,
                                     rebuild=args.rebuild)
    except (ValueError, OSError) as err:  # bad input or a full disk: one clear line, not a traceback
        report(str(err))
        return EXIT_USAGE
    for split, d in data.items():
        print(f"{split}: {d.n_docs} documents, {d.n_tokens} tokens")
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
