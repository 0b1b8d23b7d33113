"""Corpora: where documents come from, and which are held out.

Two kinds of source, one interface (`Corpus.documents()` yields
`(split, text)` with split "train" or "validation"):

- ``"stdlib"``: the embedded default. The Python standard library sources on
  this machine (``sysconfig.get_paths()["stdlib"]``, about 30 MB), one document
  per package directory (its ``.py`` files concatenated, each after a
  ``# <path>`` line), so documents are long. A fixed set of directories (chosen
  by a hash of their names, about `val_fraction` of the bytes) is held out.
- User data through HF ``datasets``: local text, JSON lines (field
  `text_field`) and Parquet files, given as files, folders or globs; or a hub
  dataset name (``hf:name``). Read in streaming mode by default, so a corpus
  never has to fit in memory. A document is held out when a hash of its text
  falls below `val_fraction`, unless `val_paths` or `val_split` name the
  held-out data explicitly.

Documented behaviour for awkward input: empty documents are skipped; text
files are read with universal newlines (CRLF and CR arrive as LF); bytes
that are not UTF-8 become U+FFFD in text files and stdlib sources
(``encoding_errors="replace"``, set ``"strict"`` to fail instead), while JSON
lines must be UTF-8 (a `CorpusError` says so); a missing file, a glob that
matches nothing, a missing text field, or a corpus without any text raise
`CorpusError` naming it. Binary files among text files (a NUL byte in their
first 8 KB, as git and grep decide) are skipped with one warning that counts
them and names a few; a corpus of nothing but binary files is a `CorpusError`.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from fmtrain.errors import UserError

SPLITS = ("train", "validation")
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
_PARQUET_SUFFIXES = (".parquet",)
_STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__"}


class CorpusError(UserError, ValueError):
    """A corpus that cannot be read: missing files, wrong fields, no text."""


@dataclass(frozen=True)
class Corpus:
    """What to read. Build one with `Corpus.parse` from a config value.

    Attributes:
        source: "stdlib", "files" or "hub".
        paths: files, folders or globs (source "files").
        name, config: hub dataset name and configuration (source "hub").
        split: the split to read for training (hub; files are all "train").
        val_split: a hub split to hold out instead of hashing documents.
        val_paths: files, folders or globs to hold out instead of hashing documents.
        val_fraction: share of documents (stdlib: of bytes) held out by hash.
        text_field: JSON / Parquet / hub column holding the text.
        format: "text", "json" or "parquet"; None infers it from each file's suffix.
        sample_by: text files: "document" (one per file, default), "paragraph" or "line".
        streaming: stream with `datasets` (never loads the corpus into memory).
        encoding_errors: "replace" (bad bytes become U+FFFD) or "strict".
        max_missing_text: largest share of JSON / Parquet / hub records allowed to hold no text
            (null, the field absent, an empty or whitespace-only text); they are counted and skipped,
            and a larger share is refused (a wrong text field or a broken export, not a few empty records).
    """

    source: str = "stdlib"
    paths: tuple[str, ...] = ()
    name: str | None = None
    config: str | None = None
    split: str = "train"
    val_split: str | None = None
    val_paths: tuple[str, ...] = ()
    val_fraction: float = 0.03
    text_field: str = "text"
    format: str | None = None
    sample_by: str = "document"
    streaming: bool = True
    encoding_errors: str = "replace"
    max_missing_text: float = 0.1

    def __post_init__(self) -> None:
        if self.source not in ("stdlib", "files", "hub"):
            raise CorpusError(f"corpus source must be 'stdlib', 'files' or 'hub', got {self.source!r}")
        if self.source == "files" and not self.paths:
            raise CorpusError("a 'files' corpus needs at least one path, folder or glob")
        if self.source == "hub" and not self.name:
            raise CorpusError("a 'hub' corpus needs a dataset name")
        if not 0.0 <= self.val_fraction < 1.0:
            raise CorpusError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.format not in (None, "text", "json", "parquet"):
            raise CorpusError(f"format must be 'text', 'json' or 'parquet', got {self.format!r}")
        if self.sample_by not in ("document", "paragraph", "line"):
            raise CorpusError(f"sample_by must be 'document', 'paragraph' or 'line', got {self.sample_by!r}")
        if self.encoding_errors not in ("replace", "strict"):
            raise CorpusError(f"encoding_errors must be 'replace' or 'strict', got {self.encoding_errors!r}")
        if not 0.0 <= self.max_missing_text <= 1.0:
            raise CorpusError(f"max_missing_text must be in [0, 1], got {self.max_missing_text}")

    @classmethod
    def parse(cls, value: "Corpus | str | Sequence[str] | Mapping[str, Any]") -> "Corpus":
        """A corpus from a config value.

        - ``"stdlib"``: the embedded default;
        - ``"hf:<name>"`` or ``"hf:<name>:<config>"``: a hub dataset;
        - any other string, or a list of strings: files, folders or globs
          (a one-item list is read as its item, so ``["stdlib"]`` works);
        - a mapping: the fields of `Corpus` (``source`` inferred from ``paths`` / ``name``).
        """
        if isinstance(value, Corpus):
            return value
        if isinstance(value, str):
            if value == "stdlib":
                return cls()
            if value.startswith("hf:"):
                name, _, config = value[3:].partition(":")
                return cls(source="hub", name=name, config=config or None)
            return cls(source="files", paths=(value,))
        if isinstance(value, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = set(value) - known
            if unknown:
                raise CorpusError(f"unknown corpus settings {sorted(unknown)}; known: {sorted(known)}")
            kw = dict(value)
            for key in ("paths", "val_paths"):
                if isinstance(kw.get(key), str):
                    kw[key] = (kw[key],)
                if key in kw:
                    kw[key] = tuple(kw[key])
            kw.setdefault("source", "files" if kw.get("paths") else "hub" if kw.get("name") else "stdlib")
            return cls(**kw)
        if isinstance(value, Sequence):
            items = [str(v) for v in value]
            if len(items) == 1:
                return cls.parse(items[0])
            special = [v for v in items if v == "stdlib" or v.startswith("hf:")]
            if special:
                raise CorpusError(f"corpus {items}: {special[0]!r} cannot be combined with other "
                                  f"sources; give it alone, or only files, folders and globs")
            if not items:
                raise CorpusError("the corpus list is empty")
            return cls(source="files", paths=tuple(items))
        raise CorpusError(f"cannot read a corpus from {value!r}")

    def describe(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict."""
        return asdict(self)

    def fingerprint(self) -> str:
        """A hash that changes when the documents may change (settings, file list, sizes, mtimes)."""
        # The threshold decides whether a corpus is refused, not what its documents are.
        settings = {k: v for k, v in self.describe().items() if k != "max_missing_text"}
        h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        if self.source == "stdlib":
            for rel, path in _stdlib_files(stdlib_root()):
                _hash_stat(h, rel, path)
        elif self.source == "files":
            for path in expand_paths(self.paths) + expand_paths(self.val_paths):
                _hash_stat(h, str(path), path)
        # Hub datasets: name, config and split only; a new cache dir picks up a changed dataset.
        return h.hexdigest()

    def size_hint(self) -> int | None:
        """Bytes on disk to read (for progress), or None when unknown."""
        if self.source == "stdlib":
            return sum(p.stat().st_size for _, p in _stdlib_files(stdlib_root()))
        if self.source == "files":
            return sum(p.stat().st_size for p in expand_paths(self.paths) + expand_paths(self.val_paths))
        return None

    def documents(self) -> Iterator[tuple[str, str]]:
        """Every non-empty document once, as (split, text), split "train" or "validation"."""
        if self.source == "stdlib":
            yield from _stdlib_documents(self.val_fraction)
            return
        explicit_val = bool(self.val_paths or self.val_split)
        for text in self._texts(train=True):
            held_out = not explicit_val and _hash_unit(text) < self.val_fraction
            yield ("validation" if held_out else "train"), text
        if explicit_val:
            for text in self._texts(train=False):
                yield "validation", text

    def _texts(self, train: bool) -> Iterator[str]:
        if self.source == "files":
            paths = _without_binary(expand_paths(self.paths if train else self.val_paths), self.format)
            for fmt, group in _group_by_format(paths, self.format):
                yield from _read_files(fmt, group, self)
        else:
            yield from _read_hub(self, self.split if train else self.val_split)


# ------------------------------------------------------------------ stdlib

def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files(root: Path) -> list[tuple[str, Path]]:
    """(relative path, path) of every .py file under `root`, sorted, third-party dirs skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = Path(dirpath) / name
                out.append((path.relative_to(root).as_posix(), path))
    return out


def stdlib_directories(root: Path | None = None) -> dict[str, list[tuple[str, Path]]]:
    """Package directory (relative, "." for the top level) -> its .py files; one document each."""
    groups: dict[str, list[tuple[str, Path]]] = {}
    for rel, path in _stdlib_files(root or stdlib_root()):
        groups.setdefault(os.path.dirname(rel) or ".", []).append((rel, path))
    return groups


def stdlib_held_out(groups: Mapping[str, list[tuple[str, Path]]], val_fraction: float) -> set[str]:
    """Directories held out: in order of a hash of their names, until `val_fraction` of the bytes.

    Directories larger than the target are passed over, so the split stays near
    the fraction (the 14 MB `test` directory always trains).
    """
    sizes = {d: sum(p.stat().st_size for _, p in files) for d, files in groups.items()}
    target = val_fraction * sum(sizes.values())
    held, total = set(), 0
    for d in sorted(sizes, key=lambda d: hashlib.blake2b(d.encode(), digest_size=8).digest()):
        if total >= target:
            break
        if 0 < sizes[d] <= target - total + 0.5 * target:
            held.add(d)
            total += sizes[d]
    return held


def _stdlib_documents(val_fraction: float) -> Iterator[tuple[str, str]]:
    root = stdlib_root()
    groups = stdlib_directories(root)
    if not groups:
        raise CorpusError(f"no Python sources under the standard library path {root}")
    held = stdlib_held_out(groups, val_fraction)
    for d, files in groups.items():
        yield ("validation" if d in held else "train"), directory_text(files)


def directory_text(files: list[tuple[str, Path]]) -> str:
    """One document of a directory's files: each with a ``# relative/path`` header, in order."""
    # Some test files are deliberately not UTF-8: decode with replacement.
    parts = [f"# {rel}\n" + path.read_bytes().decode("utf-8", errors="replace") for rel, path in files]
    return "\n".join(p if p.endswith("\n") else p + "\n" for p in parts)


def package_documents(packages: Sequence[str] = ("torch", "numpy"), min_bytes: int = 400_000) -> dict[str, str]:
    """Long documents found wherever fmtrain is installed: every directory of the installed
    ``packages``' Python sources holding at least ``min_bytes`` of them, as one document (grouped
    as the stdlib corpus groups its files), keyed ``package/dir``. No corpus trains on them: an
    evaluation set of long documents (``bench/long_context.py --eval-docs packages``)."""
    import importlib

    out = {}
    for name in packages:
        root = Path(importlib.import_module(name).__file__).parent
        for d, files in stdlib_directories(root).items():
            if sum(p.stat().st_size for _, p in files) >= min_bytes:
                out[f"{name}/{d}".rstrip("/.")] = directory_text(files)
    return out


# ------------------------------------------------------------------ files and hub

def expand_paths(patterns: Sequence[str]) -> list[Path]:
    """Files named by paths, folders (recursively) and globs, in order; an error for any that match nothing."""
    out: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
            files = [p for p in matches if p.is_file()]
            if not files:
                raise CorpusError(f"no files match {pattern!r}")
            out.extend(files)
        elif os.path.isdir(pattern):
            files = sorted(p for p in Path(pattern).rglob("*")
                           if p.is_file() and not any(part.startswith(".") for part in p.parts))
            if not files:
                raise CorpusError(f"folder {pattern!r} holds no files")
            out.extend(files)
        elif os.path.isfile(pattern):
            out.append(Path(pattern))
        else:
            raise CorpusError(f"corpus file {pattern!r} does not exist")
    return out


_SNIFF_BYTES = 8192
_warned_binary: set[tuple[str, ...]] = set()  # one warning per file list and process


def is_binary(path: Path) -> bool:
    """A NUL byte in the first 8 KB: no text encoding fmtrain reads (UTF-8) produces one."""
    with open(path, "rb") as fh:
        return b"\0" in fh.read(_SNIFF_BYTES)


def _without_binary(paths: list[Path], forced: str | None) -> list[Path]:
    """``paths`` less the binary files among those read as text or JSON lines (a warning counts them)."""
    binary = [p for p in paths if _file_format(p, forced) != "parquet" and is_binary(p)]
    if not binary:
        return paths
    kept = [p for p in paths if p not in set(binary)]
    if not kept:
        raise CorpusError(f"every corpus file is binary (a NUL byte in its first {_SNIFF_BYTES} bytes), "
                          f"e.g. {binary[0]}: give text, .jsonl or .parquet files")
    key = tuple(map(str, binary))
    if key not in _warned_binary:
        _warned_binary.add(key)
        shown = ", ".join(map(str, binary[:3])) + (", ..." if len(binary) > 3 else "")
        print(f"warning: skipped {len(binary)} binary file(s) of {len(paths)} in the corpus (a NUL byte in "
              f"the first {_SNIFF_BYTES} bytes): {shown}", file=sys.stderr, flush=True)
    return kept


def _file_format(path: Path, forced: str | None) -> str:
    if forced:
        return forced
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(_JSON_SUFFIXES):
        return "json"
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def _group_by_format(paths: list[Path], forced: str | None) -> Iterator[tuple[str, list[Path]]]:
    """Consecutive runs of files of one format (order kept)."""
    run: list[Path] = []
    fmt = None
    for p in paths:
        f = _file_format(p, forced)
        if run and f != fmt:
            yield fmt, run
            run = []
        fmt = f
        run.append(p)
    if run:
        yield fmt, run


def _read_files(fmt: str, paths: list[Path], corpus: Corpus) -> Iterator[str]:
    import datasets

    kwargs: dict[str, Any] = {}
    if fmt == "text":
        # By line, EOS marks each line's end, so the line break itself is dropped.
        kwargs = dict(sample_by=corpus.sample_by, keep_linebreaks=corpus.sample_by != "line",
                      encoding_errors=corpus.encoding_errors)
    elif fmt == "json":
        kwargs = dict(encoding_errors=corpus.encoding_errors)
    elif fmt == "parquet":
        _check_parquet_column(paths, corpus.text_field)
        kwargs = dict(columns=[corpus.text_field])
    where = _name_files(paths)
    try:
        ds = datasets.load_dataset(fmt, data_files={"train": [str(p) for p in paths]}, split="train",
                                   streaming=corpus.streaming, **kwargs)
        field_name = "text" if fmt == "text" else corpus.text_field
        # The lines or files of text files may be blank; records that are count as holding no text.
        yield from _texts_of_rows(ds, field_name, where, corpus.max_missing_text, records=fmt != "text")
    except CorpusError:
        raise
    except UnicodeDecodeError as err:
        if fmt == "text" and corpus.encoding_errors == "strict":
            hint = "set encoding_errors='replace' to read it with U+FFFD for the bad bytes"
        else:  # the JSON reader decodes strictly whatever encoding_errors says
            hint = "JSON lines must be UTF-8: re-encode the file (e.g. iconv -f latin1 -t utf-8)"
        raise CorpusError(f"{where} is not valid UTF-8 ({err}); {hint}") from err
    except Exception as err:  # datasets / pyarrow errors: name the files
        raise CorpusError(f"could not read {where} as {fmt}: {type(err).__name__}: {err}") from err


def _check_parquet_column(paths: list[Path], column: str) -> None:
    import pyarrow.parquet as pq

    for path in paths:
        names = pq.read_schema(path).names
        if column not in names:
            raise CorpusError(f"{path} has no column {column!r} (columns: {names}); set data.text_field")


def _read_hub(corpus: Corpus, split: str | None) -> Iterator[str]:
    import datasets

    where = f"hub dataset {corpus.name!r}" + (f" ({corpus.config})" if corpus.config else "") + f" split {split!r}"
    try:
        ds = datasets.load_dataset(corpus.name, corpus.config, split=split, streaming=corpus.streaming)
        yield from _texts_of_rows(ds, corpus.text_field, where, corpus.max_missing_text)
    except CorpusError:
        raise
    except Exception as err:
        raise CorpusError(f"could not load {where}: {type(err).__name__}: {err} "
                          f"(offline? HF_DATASETS_OFFLINE is {os.environ.get('HF_DATASETS_OFFLINE')!r})") from err


def _texts_of_rows(ds: Any, field_name: str, where: str, max_missing: float = 1.0, *,
                   records: bool = True) -> Iterator[str]:
    """The non-empty `field_name` values of a dataset's rows. Rows without text are counted: null,
    the field absent from a JSON record, and (``records``: JSON, Parquet, hub rows, not lines of text
    files) an empty or whitespace-only text. A warning names their number and kinds, and more than
    `max_missing` of the rows is an error (checked when the files are read through). Null, absent and
    empty ones are skipped; whitespace-only ones are kept in the stream (as they always were)."""
    rows = found = empty = blank = 0
    for row in ds:
        rows += 1
        if field_name not in row:
            raise CorpusError(f"{where} has no field {field_name!r} (fields: {sorted(row)}); "
                              f"set data.text_field")
        text = row[field_name]
        if text is None:  # JSON records without the field
            continue
        if not isinstance(text, str):
            raise CorpusError(f"{where}: field {field_name!r} holds {type(text).__name__}, not text")
        found += 1
        if not text:
            empty += 1
            continue
        if records and text.isspace():
            blank += 1
        yield text
    if rows and not found:
        raise CorpusError(f"no record of {where} has the field {field_name!r}; set data.text_field")
    if not records:
        return
    absent = rows - found
    missing = absent + empty + blank
    kinds = ", ".join(f"{n} {kind}" for n, kind in ((absent, "null or absent"), (empty, "empty"),
                                                   (blank, "only whitespace")) if n)
    if missing and missing > max_missing * rows:
        raise CorpusError(f"{missing} of {rows} records of {where} have no text in {field_name!r} ({kinds}), more "
                          f"than data.max_missing_text = {max_missing}: check data.text_field and the files, or "
                          f"raise data.max_missing_text to train on the other {rows - missing}")
    if missing:
        print(f"warning: {missing} of {rows} records of {where} have no text in {field_name!r} ({kinds}); they are "
              "skipped" + (" (those of only whitespace are kept)" if blank else ""), file=sys.stderr, flush=True)


def _name_files(paths: list[Path]) -> str:
    shown = ", ".join(str(p) for p in paths[:3])
    return f"{shown} (+{len(paths) - 3} more)" if len(paths) > 3 else shown


def _hash_unit(text: str) -> float:
    """A deterministic number in [0, 1) from a document's text (the held-out draw)."""
    digest = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def _hash_stat(h: "hashlib._Hash", name: str, path: Path) -> None:
    st = path.stat()
    h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())


# ------------------------------------------------------------------ command-line arguments

def add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    """The corpus options shared by the data commands."""
    g = parser.add_argument_group("corpus (default: the Python stdlib sources)")
    g.add_argument("--files", nargs="+", metavar="PATH", help="text / JSON lines / Parquet files, folders or globs")
    g.add_argument("--hub", metavar="NAME", help="a hub dataset name (needs network)")
    g.add_argument("--hub-config", metavar="CONFIG", help="the hub dataset's configuration")
    g.add_argument("--hub-split", default="train", help="the hub split to train on (default train)")
    g.add_argument("--hub-val-split", help="a hub split to hold out (default: hash-held-out documents)")
    g.add_argument("--val-files", nargs="+", metavar="PATH", help="held-out files (default: hash-held-out documents)")
    g.add_argument("--text-field", default="text", help="JSON / Parquet / hub field with the text (default text)")
    g.add_argument("--format", choices=("text", "json", "parquet"), help="default: from each file's suffix")
    g.add_argument("--sample-by", choices=("document", "paragraph", "line"), default="document",
                   help="text files: one document per file (default), paragraph or line")
    g.add_argument("--val-fraction", type=float, default=0.03, help="share held out (default 0.03)")


def corpus_from_arguments(args: argparse.Namespace) -> Corpus:
    common = dict(text_field=args.text_field, format=args.format, sample_by=args.sample_by,
                  val_fraction=args.val_fraction)
    if args.files and args.hub:
        raise CorpusError("give --files or --hub, not both")
    if args.files:
        return Corpus(source="files", paths=tuple(args.files), val_paths=tuple(args.val_files or ()), **common)
    if args.val_files:
        raise CorpusError("--val-files goes with --files")
    if args.hub:
        return Corpus(source="hub", name=args.hub, config=args.hub_config, split=args.hub_split,
                      val_split=args.hub_val_split, **common)
    return Corpus(val_fraction=args.val_fraction)
