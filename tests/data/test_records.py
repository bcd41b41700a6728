"""Reading data files, and the errors bad files get: file, line/record, field and a fix."""

import json

import pytest

from loralab.data.formats import detect_format, to_conversation, to_spans, to_tokens
from loralab.data.records import read_records
from loralab.errors import LoralabError


def write(path, text, mode="w"):
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def error_of(fn, *args):
    with pytest.raises(LoralabError) as err:
        fn(*args)
    return err.value


def test_reads_json_array_jsonl_csv_tsv_and_parquet(tmp_path):
    rows = [{"text": "good", "label": "1"}, {"text": "bad, really", "label": "0"}]
    write(tmp_path / "a.json", json.dumps(rows))
    write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    write(tmp_path / "a.csv", 'text,label\ngood,1\n"bad, really",0\n')
    write(tmp_path / "a.tsv", 'text\tlabel\ngood\t1\nbad, really\t0\n')
    import pandas as pd

    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    for name in ("a.json", "a.jsonl", "a.csv", "a.tsv", "a.parquet"):
        records = read_records(tmp_path / name)
        assert [str(r.data["text"]) for r in records] == ["good", "bad, really"], name
        assert [str(r.data["label"]) for r in records] == ["1", "0"], name
    assert [r.line for r in read_records(tmp_path / "a.csv")] == [2, 3]  # the header is line 1


def test_columns_are_mapped_and_limit_applies(tmp_path):
    write(tmp_path / "a.jsonl", '{"sentence": "x", "y": 1}\n{"sentence": "z", "y": 0}\n')
    records = read_records(tmp_path / "a.jsonl", columns={"text": "sentence", "label": "y"}, limit=1)
    assert len(records) == 1 and records[0].data == {"text": "x", "label": 1}


def test_malformed_jsonl_line_is_named(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": \n')
    error = error_of(read_records, path)
    assert error.file == str(path) and error.record == 2 and "malformed JSON" in str(error)


def test_malformed_json_array_names_the_line(tmp_path):
    path = write(tmp_path / "bad.json", '[\n {"text": "a"},\n {"text": }\n]')
    assert error_of(read_records, path).record == 3


def test_empty_missing_and_non_utf8_files(tmp_path):
    assert "empty" in str(error_of(read_records, write(tmp_path / "e.jsonl", "\n  \n")))
    assert "not found" in str(error_of(read_records, tmp_path / "nope.jsonl"))
    error = error_of(read_records, write(tmp_path / "gbk.jsonl", '{"text": "ok"}\n{"text": "坏"}\n'.encode("gbk"),
                                         "wb"))
    assert "not UTF-8" in str(error) and error.record == 2 and "iconv" in error.fix
    assert "unsupported file type" in str(error_of(read_records, write(tmp_path / "a.xml", "<a/>")))


def test_missing_empty_and_wrongly_typed_fields(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"instruction": "hi", "output": "yo"}\n{"instruction": "hi"}\n'
                                       '{"instruction": "", "output": "x"}\n{"instruction": 3, "output": "x"}\n')
    records = read_records(path)
    assert to_conversation(records[0], "alpaca")[-1] == {"role": "assistant", "content": "yo"}
    missing = error_of(to_conversation, records[1], "alpaca")
    assert (missing.file, missing.record, missing.field) == (str(path), 2, "output") and "data.columns" in missing.fix
    assert error_of(to_conversation, records[2], "alpaca").field == "instruction"
    assert "expected str, got int" in str(error_of(to_conversation, records[3], "alpaca"))


def test_format_detection_and_messages(tmp_path):
    path = write(tmp_path / "m.jsonl", json.dumps({"conversations": [
        {"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}) + "\n"
        + json.dumps({"messages": [{"role": "wizard", "content": "?"}]}) + "\n" + json.dumps({"foo": 1}) + "\n")
    sharegpt, bad_role, unknown = read_records(path)
    assert detect_format(sharegpt) == "messages"
    assert [t["role"] for t in to_conversation(sharegpt, "messages")] == ["system", "user", "assistant"]
    assert error_of(to_conversation, bad_role, "messages").field == "messages[0].role"
    assert "data.format" in error_of(detect_format, unknown).fix


def test_span_and_token_checks(tmp_path):
    path = write(tmp_path / "s.jsonl", "\n".join(json.dumps(r) for r in [
        {"text": "Paris is nice", "spans": [[0, 5, "LOC"]]},
        {"text": "Paris", "spans": [[0, 9, "LOC"]]},
        {"text": "Paris is nice", "spans": [[0, 5, "LOC"], [3, 8, "X"]]},
        {"tokens": ["a", "b"], "tags": ["O"]},
        {"text": "Paris is nice", "spans": [[5, 0, "LOC"]]}]))
    ok, outside, overlap, tokens, reversed_span = read_records(path)
    assert "not after its start 5" in str(error_of(to_spans, reversed_span))
    assert to_spans(ok) == ("Paris is nice", [(0, 5, "LOC")])
    assert "outside the text" in str(error_of(to_spans, outside)) and error_of(to_spans, outside).field == "spans[0]"
    assert "overlap" in str(error_of(to_spans, overlap))
    assert "2 tokens but 1 tags" in str(error_of(to_tokens, tokens))


def test_folders_broken_links_other_encodings_and_damaged_parquet_are_named_as_such(tmp_path):
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "loop.jsonl").symlink_to(tmp_path / "loop.jsonl")
    (tmp_path / "gbk.csv").write_bytes("text,label\n很好,1\n".encode("gbk"))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    for name, message in (("folder.jsonl", "a folder, not a data file"), ("loop.jsonl", "broken, or a loop"),
                          ("gbk.csv", "not UTF-8"), ("bad.parquet", "not a readable parquet file")):
        with pytest.raises(LoralabError, match=message) as error:
            read_records(tmp_path / name)
        assert error.value.file == str(tmp_path / name)
