from dataclasses import replace

import pytest

from fmtrain.data.corpus import Corpus, CorpusError, expand_paths, stdlib_directories, stdlib_held_out
from tests.data.conftest import write_jsonl


# ------------------------------------------------------------------ stdlib

@pytest.fixture(scope="module")
def stdlib_docs():
    return list(Corpus().documents())


def test_stdlib_one_document_per_package_directory(stdlib_docs):
    groups = stdlib_directories()
    assert len(stdlib_docs) == len(groups) >= 50
    total = sum(len(t.encode()) for _, t in stdlib_docs)
    assert total > 10_000_000                                  # about 30 MB on CPython 3.10+
    assert max(len(t) for _, t in stdlib_docs) > 1_000_000     # long documents (the test package)
    assert all(t for _, t in stdlib_docs)
    first = stdlib_docs[0][1]
    assert first.startswith("# ") and ".py\n" in first.splitlines(keepends=True)[0]


def test_stdlib_held_out_split_is_deterministic_and_small(stdlib_docs):
    groups = stdlib_directories()
    held = stdlib_held_out(groups, 0.03)
    assert held == stdlib_held_out(stdlib_directories(), 0.03)
    assert "test" not in held and "." not in held
    val = sum(len(t.encode()) for s, t in stdlib_docs if s == "validation")
    total = sum(len(t.encode()) for _, t in stdlib_docs)
    assert 0.01 < val / total < 0.06
    assert [s for s, _ in stdlib_docs].count("validation") == len(held)
    assert stdlib_held_out(groups, 0.0) == set()


# ------------------------------------------------------------------ parsing

def test_parse_forms(tmp_path):
    assert Corpus.parse("stdlib") == Corpus() == Corpus.parse(["stdlib"])
    hub = Corpus.parse("hf:org/name:cfg")
    assert (hub.source, hub.name, hub.config) == ("hub", "org/name", "cfg")
    files = Corpus.parse(["a/*.txt", "b.jsonl"])
    assert files.source == "files" and files.paths == ("a/*.txt", "b.jsonl")
    d = Corpus.parse({"paths": "x.jsonl", "text_field": "content", "val_fraction": 0.1})
    assert (d.source, d.paths, d.text_field) == ("files", ("x.jsonl",), "content")
    with pytest.raises(CorpusError, match="unknown corpus settings"):
        Corpus.parse({"pathz": ["x"]})
    with pytest.raises(CorpusError, match="cannot be combined"):
        Corpus.parse(["stdlib", "x.txt"])
    with pytest.raises(CorpusError, match="val_fraction"):
        Corpus(val_fraction=1.5)
    with pytest.raises(CorpusError, match="format"):
        Corpus(source="files", paths=("x",), format="csv")


# ------------------------------------------------------------------ files

def test_text_files_one_document_each_exactly(tmp_path):
    texts = ["line one\n\n  indented\ttab\nlast", "second\r\nfile with CRLF\r\n", "\n  \n"]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_bytes(t.encode())
    docs = list(Corpus(source="files", paths=(str(tmp_path / "*.txt"),), val_fraction=0).documents())
    # Text is read with universal newlines (documented): CRLF arrives as LF.
    assert docs == [("train", t.replace("\r\n", "\n")) for t in texts]


def test_text_files_by_line(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n\nthree\n")
    docs = [t for _, t in Corpus(source="files", paths=(str(tmp_path / "a.txt"),), sample_by="line",
                                  val_fraction=0).documents()]
    assert docs == ["one", "two", "three"]         # line breaks dropped (EOS ends each), empty line skipped


def test_jsonl_with_configurable_field(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"content": "first doc\n"}, {"content": "second"}, {"other": 1}])
    c = Corpus(source="files", paths=(str(tmp_path / "a.jsonl"),), text_field="content", val_fraction=0,
               max_missing_text=0.5)
    assert [t for _, t in c.documents()] == ["first doc\n", "second"]   # the record without it is skipped
    wrong = Corpus(source="files", paths=(str(tmp_path / "a.jsonl"),), val_fraction=0)
    with pytest.raises(CorpusError, match="'text'.*content"):
        list(wrong.documents())


def test_records_without_text_are_counted_and_a_large_share_refused(tmp_path, capfd):
    """60 of 90 records with "text": null once trained on the other 30 without a word."""
    path = tmp_path / "a.jsonl"
    write_jsonl(path, [{"text": None if i % 3 else f"doc {i}"} for i in range(90)])
    c = Corpus(source="files", paths=(str(path),), val_fraction=0)
    with pytest.raises(CorpusError, match=r"60 of 90 records .* data.max_missing_text = 0.1"):
        list(c.documents())
    assert len(list(replace(c, max_missing_text=0.7).documents())) == 30
    assert "warning: 60 of 90 records" in capfd.readouterr().err
    # A few are skipped with the count said; the threshold does not change the cache key.
    write_jsonl(path, [{"text": None if i == 7 else f"doc {i}"} for i in range(90)])
    assert len(list(c.documents())) == 89
    assert "warning: 1 of 90 records" in capfd.readouterr().err
    assert replace(c, max_missing_text=0.7).fingerprint() == c.fingerprint()
    with pytest.raises(CorpusError, match="max_missing_text must be in"):
        replace(c, max_missing_text=2.0)


def test_records_with_empty_or_blank_text_count_as_missing_and_the_message_says_which(tmp_path, capfd):
    """60 of 90 records with "text": "" trained on the other 30 without a word."""
    path = tmp_path / "a.jsonl"
    write_jsonl(path, [{"text": "" if i % 3 else f"doc {i}"} for i in range(90)])
    c = Corpus(source="files", paths=(str(path),), val_fraction=0)
    with pytest.raises(CorpusError, match=r"^60 of 90 records of .*a.jsonl have no text in 'text' \(60 empty\), "
                                          r"more than data.max_missing_text = 0.1: check data.text_field and the "
                                          r"files, or raise data.max_missing_text to train on the other 30$"):
        list(c.documents())
    # Each kind counted and named: null, absent, empty, only whitespace (the last kept, as it always was).
    rows = [{"text": None}] * 10 + [{"other": 1}] * 10 + [{"text": ""}] * 20 + [{"text": " \n\t "}] * 20 + \
        [{"text": f"doc {i}"} for i in range(30)]
    write_jsonl(path, rows)
    with pytest.raises(CorpusError, match=r"60 of 90 records .* \(20 null or absent, 20 empty, 20 only whitespace\)"):
        list(c.documents())
    docs = [t for _, t in replace(c, max_missing_text=0.7).documents()]
    assert len(docs) == 50 and sum(t.isspace() for t in docs) == 20
    err = capfd.readouterr().err
    assert "warning: 60 of 90 records" in err and "(20 null or absent, 20 empty, 20 only whitespace); they are " \
        "skipped (those of only whitespace are kept)" in err
    # Parquet rows too.
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["", "x", "", "   ", "y"]}), tmp_path / "b.parquet")
    with pytest.raises(CorpusError, match=r"3 of 5 records .*b.parquet have no text in 'text' \(2 empty, 1 only "
                                          r"whitespace\)"):
        list(Corpus(source="files", paths=(str(tmp_path / "b.parquet"),), val_fraction=0).documents())
    # Blank lines of text files are no records: skipped, not counted.
    (tmp_path / "c.txt").write_text("one\n\n\n   \n\ntwo\n")
    lines = [t for _, t in Corpus(source="files", paths=(str(tmp_path / "c.txt"),), sample_by="line",
                                  val_fraction=0).documents()]
    assert lines == ["one", "   ", "two"] and "warning" not in capfd.readouterr().err


def test_parquet_and_folders(tmp_path):
    import pyarrow as pa                  # a dependency of datasets
    import pyarrow.parquet as pq
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["alpha", "beta"], "n": [1, 2]}), folder / "part0.parquet")
    pq.write_table(pa.table({"text": ["gamma"], "n": [3]}), folder / "part1.parquet")
    c = Corpus.parse({"paths": [str(folder)], "val_fraction": 0})
    assert [t for _, t in c.documents()] == ["alpha", "beta", "gamma"]


def test_parquet_without_the_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(CorpusError, match=r"no column 'text' \(columns: \['body'\]\)"):
        list(Corpus.parse(str(tmp_path / "p.parquet")).documents())
    c = Corpus.parse({"paths": [str(tmp_path / "p.parquet")], "text_field": "body", "val_fraction": 0})
    assert [t for _, t in c.documents()] == ["x"]


def test_mixed_formats_in_order(tmp_path):
    (tmp_path / "a.txt").write_text("plain")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "json"}])
    c = Corpus.parse([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])
    assert [t for _, t in Corpus.parse({"paths": list(c.paths), "val_fraction": 0}).documents()] == ["plain", "json"]


def test_empty_files_are_skipped_and_empty_corpus_has_no_documents(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "full.txt").write_text("some text")
    write_jsonl(tmp_path / "e.jsonl", [{"text": ""}] + [{"text": "a record"}] * 10)  # one empty record of 11
    c = Corpus.parse({"paths": [str(tmp_path / "*.txt"), str(tmp_path / "e.jsonl")], "val_fraction": 0})
    assert [t for _, t in c.documents()] == ["some text"] + ["a record"] * 10
    only_empty = Corpus.parse({"paths": [str(tmp_path / "empty.txt")]})
    assert list(only_empty.documents()) == []


def test_non_utf8_bytes_replaced_or_refused(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 ok\n")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    replaced = Corpus.parse({"paths": [str(tmp_path / "bad.txt")], "val_fraction": 0})
    assert [t for _, t in replaced.documents()] == ["caf\ufffd ok\n"]
    strict = Corpus.parse({"paths": [str(tmp_path / "bad.txt")], "encoding_errors": "strict"})
    with pytest.raises(CorpusError, match="bad.txt.*not valid UTF-8"):
        list(strict.documents())
    js = Corpus.parse({"paths": [str(tmp_path / "bad.jsonl")], "val_fraction": 0})
    with pytest.raises(CorpusError, match="bad.jsonl.*JSON lines must be UTF-8"):
        list(js.documents())


def test_missing_files_and_empty_globs(tmp_path):
    with pytest.raises(CorpusError, match="nope.txt.*does not exist"):
        list(Corpus.parse(str(tmp_path / "nope.txt")).documents())
    with pytest.raises(CorpusError, match="no files match"):
        expand_paths([str(tmp_path / "*.jsonl")])
    (tmp_path / "sub").mkdir()
    with pytest.raises(CorpusError, match="holds no files"):
        expand_paths([str(tmp_path / "sub")])


def test_hash_split_deterministic_and_near_fraction(tmp_path):
    write_jsonl(tmp_path / "many.jsonl", [{"text": f"document number {i}"} for i in range(2000)])
    c = Corpus.parse({"paths": [str(tmp_path / "many.jsonl")], "val_fraction": 0.1})
    splits = [s for s, _ in c.documents()]
    assert splits == [s for s, _ in c.documents()]
    assert 0.07 < splits.count("validation") / len(splits) < 0.13


def test_explicit_validation_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}"} for i in range(20)])
    write_jsonl(tmp_path / "val.jsonl", [{"text": "v0"}, {"text": "v1"}])
    c = Corpus.parse({"paths": [str(tmp_path / "train.jsonl")], "val_paths": [str(tmp_path / "val.jsonl")]})
    docs = list(c.documents())
    assert [t for s, t in docs if s == "validation"] == ["v0", "v1"]
    assert len([t for s, t in docs if s == "train"]) == 20


def test_fingerprint_follows_the_files(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one")
    c = Corpus.parse(str(f))
    before = c.fingerprint()
    assert before == Corpus.parse(str(f)).fingerprint()
    f.write_text("one more")
    assert c.fingerprint() != before
    assert Corpus.parse({"paths": [str(f)], "text_field": "x"}).fingerprint() != c.fingerprint()
    assert c.size_hint() == len("one more")


def test_hub_dataset_from_a_local_folder(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "from the hub path"}])
    c = Corpus(source="hub", name=str(tmp_path), val_fraction=0)
    assert [t for _, t in c.documents()] == ["from the hub path"]


def test_hub_dataset_offline_fails_clearly():
    c = Corpus.parse("hf:someone/not-a-dataset-xyz")
    with pytest.raises(CorpusError, match="could not load hub dataset 'someone/not-a-dataset-xyz'"):
        list(c.documents())


def test_package_documents_are_long_directories_of_installed_sources():
    from fmtrain.data.corpus import package_documents

    docs = package_documents(("numpy",), min_bytes=200_000)
    assert docs and all(name.startswith("numpy") for name in docs)
    for name, text in docs.items():
        assert len(text.encode()) >= 200_000 * 0.99, name  # decoded with replacement: about its bytes
        assert text.startswith("# "), name  # each file under its relative path
