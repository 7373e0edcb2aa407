"""Your own data: local files through the `datasets` library's packaged builders, every common format, the
TEXT_FIELD rules, errors that name the file and the line, all before the teacher loads (issue 15; 14.3, 14.5)."""
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import WORDS, CountingLoader, make_teacher, make_tokenizer, tiny_run_config, write_corpus

import spoonfeed_helpers as sf


def words(n, rng):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def texts(source, **kw):
    return list(sf.iter_texts(str(source), **kw))


def phase1(tmp_path, dataset, loader=None, **kw):
    """Phase 1 on the tiny teacher; returns (cache, loader)."""
    cfg = tiny_run_config(tmp_path, dataset=str(dataset), **kw)
    loader = loader or CountingLoader()
    return sf.cache_teacher_states(cfg, loader=loader, progress=False), loader


def sixgrams(blocks, eos):
    out = set()
    for row in blocks.tolist():
        out |= {tuple(row[i:i + 6]) for i in range(len(row) - 5) if eos not in row[i:i + 6]}
    return out


# --- every format, each on a small file written at test time -------------------------------------------------


def test_txt_is_read_by_the_datasets_text_builder_and_split_at_blank_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("the first paragraph is here\nwith a second line\n\n\nthe second paragraph\n")
    assert texts(f, max_chars=50) == ["the first paragraph is here\nwith a second line", "the second paragraph"]
    assert texts(f) == ["the first paragraph is here\nwith a second line\n\nthe second paragraph"]  # one document


@pytest.mark.parametrize("suffix", [".py", ".md"])
def test_source_files_are_whole_documents(tmp_path, suffix):
    body = "def f():\n\n\n    return 1\n\n# the end of a file with blank lines\n"
    (tmp_path / f"a{suffix}").write_text(body)
    assert texts(tmp_path / f"a{suffix}", max_chars=20) == [body]


@pytest.mark.parametrize("name", ["a.jsonl", "a.json"])
def test_json_lines(tmp_path, name):
    rows = [{"text": "json line document"}, {"text": "tiny"}, {"instruction": "question text", "response": "answer"}]
    (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert texts(tmp_path / name) == ["json line document", "question text\nanswer"]


def test_json_array_file(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "first array record"}, {"text": "second array record"}]))
    assert texts(tmp_path / "a.json") == ["first array record", "second array record"]


def test_csv(tmp_path):
    (tmp_path / "a.csv").write_text('id,text\n1,a csv row of text\n2,"quoted, with a comma"\n')
    assert texts(tmp_path / "a.csv") == ["a csv row of text", "quoted, with a comma"]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a parquet row of text", "another parquet row"], "n": [1, 2]}),
                   tmp_path / "a.parquet")
    assert texts(tmp_path / "a.parquet") == ["a parquet row of text", "another parquet row"]


@pytest.mark.parametrize("as_dict", [False, True])
def test_folder_written_by_save_to_disk(tmp_path, as_dict):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_dict({"content": ["a saved dataset row", "another saved row"]})
    (DatasetDict({"train": ds}) if as_dict else ds).save_to_disk(str(tmp_path / "saved"))
    assert texts(tmp_path / "saved", text_field="content") == ["a saved dataset row", "another saved row"]


def test_folder_and_glob_mix_formats_in_sorted_order_and_list_what_they_ignore(tmp_path):
    (tmp_path / "a.txt").write_text("plain text document here")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "json line document"}) + "\n")
    (tmp_path / "c.py").write_text("def f():\n    return 1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.csv").write_text("text\na csv row of text\n")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    (tmp_path / ".hidden.txt").write_text("never read, it is hidden")
    report = sf.DataReport(str(tmp_path))
    assert texts(tmp_path, report=report) == ["plain text document here", "json line document",
                                               "def f():\n    return 1\n", "a csv row of text"]
    assert [Path(f).name for f in report.ignored] == ["notes.pdf"]
    assert "notes.pdf" in sf.describe_data(report)
    assert texts(tmp_path / "*.py") == ["def f():\n    return 1\n"]
    assert texts(tmp_path / "**" / "*.csv") == ["a csv row of text"]


def test_hub_datasets_are_streamed_through_the_same_record_rules(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split=None, streaming=False, **kw):
        calls.append((name, split, streaming))
        return iter([{"instruction": "Explain recursion please", "response": None},
                     {"instruction": None, "response": "a response with no instruction"},
                     {"text": "a streamed text record"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    report = sf.DataReport("org/name")
    assert texts("org/name", report=report) == ["Explain recursion please", "a streamed text record"]
    assert calls == [("org/name", "train", True)]
    assert report.skipped == {"'instruction' None or empty": [1, "org/name record index 1"]}


# --- a large single file fills the blocks; held-out text is never training text --------------------------------


@pytest.mark.parametrize("blank_lines", [False, True])
def test_one_big_txt_file_fills_every_requested_block(tmp_path, blank_lines):
    rng = random.Random(1)
    sep = "\n\n" if blank_lines else "\n"
    (tmp_path / "data").mkdir()
    big = tmp_path / "data" / "big.txt"
    big.write_text(sep.join(words(12, rng) + " ." for _ in range(400)))  # ~5,000 tokens, one file
    cache, _ = phase1(tmp_path, big, num_samples=24, val_samples=6, seq_len=16)
    assert (cache.num_train, cache.num_val) == (24, 6)  # the old reader made one 4-block document of it
    eos = make_tokenizer().eos_token_id
    assert not sixgrams(cache.train_tokens, eos) & sixgrams(cache.val_tokens, eos)


def test_a_big_file_is_cut_into_disjoint_documents_that_cover_it_once(tmp_path):
    rng = random.Random(2)
    text = "\n".join(words(15, rng) for _ in range(300))  # no blank line at all
    (tmp_path / "big.txt").write_text(text)
    docs = texts(tmp_path / "big.txt", max_chars=200)
    assert len(docs) > 50 and all(len(d) <= 200 for d in docs)
    assert " ".join(docs).split() == text.split()  # every word once, in order: no overlap, nothing lost
    train, val, val_docs = sf.pack_blocks(iter(docs), make_tokenizer(), seq_len=16, num_train=24, num_val=6)
    assert val_docs[0] == 9  # held-out takes whole documents: disjoint regions of the file
    eos = make_tokenizer().eos_token_id
    assert not sixgrams(train, eos) & sixgrams(val, eos)


# --- TEXT_FIELD --------------------------------------------------------------------------------------------------


def chat_tokenizer():
    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
    return tok


def test_auto_takes_text_then_instruction_and_response_then_a_chat_list():
    tok = chat_tokenizer()
    assert sf.record_text({"text": "a long enough text", "instruction": "ignored"}) == "a long enough text"
    assert sf.record_text({"instruction": "Explain this", "response": "Sure."}) == "Explain this\nSure."
    chat = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi, how can I help?"}]
    assert sf.record_text({"messages": chat}, tokenizer=tok) == "<user> hello there\n<assistant> hi, how can I help?\n"
    sharegpt = [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "hi, how can I help?"}]
    assert sf.record_text({"conversations": sharegpt}, tokenizer=tok) == sf.record_text({"messages": chat}, tokenizer=tok)
    assert sf.record_text({"messages": chat}, tokenizer=make_tokenizer()) == "hello there\nhi, how can I help?"
    assert sf.record_text({"messages": [{"role": "user", "content": "not a chat"}, "oops"]}) is None


def test_chat_lists_in_a_jsonl_file_are_rendered_with_the_chat_template(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi, friend"}]},
            {"conversations": [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "hi, friend"}]}]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    report = sf.DataReport(str(tmp_path / "chat.jsonl"))
    out = texts(tmp_path / "chat.jsonl", tokenizer=chat_tokenizer(), report=report)
    assert out == ["<user> hello there\n<assistant> hi, friend\n"] * 2
    assert report.chat_rendered == "the tokenizer's chat template"


def test_none_and_empty_fields_count_as_missing():
    assert sf.record_text({"instruction": "Explain recursion please", "response": None}) == "Explain recursion please"
    assert sf.record_text({"instruction": "Explain recursion please", "response": ""}) == "Explain recursion please"
    assert sf.record_text({"instruction": None, "response": "a response alone"}) is None  # no TypeError
    assert sf.record_text({"text": None, "instruction": "the instruction wins"}) == "the instruction wins"
    assert sf.record_text({"text": "   ", "messages": []}) is None
    assert sf.record_text({"text": "short"}) is None  # the original's 10-character rule
    assert sf.record_text({"other": "field"}) is None
    assert sf.record_text({"content": "named by TEXT_FIELD"}, text_field="content") == "named by TEXT_FIELD"


def test_text_field_names_the_column(tmp_path):
    rows = [{"content": "a content field record", "id": 1}, {"content": None, "id": 2}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    report = sf.DataReport(str(tmp_path / "a.jsonl"), "content")
    assert texts(tmp_path / "a.jsonl", text_field="content", report=report) == ["a content field record"]
    assert report.skipped == {"'content' None or empty": [1, f"{tmp_path / 'a.jsonl'} record index 1"]}


def test_a_field_no_record_has_is_an_error_listing_the_fields_before_the_teacher_loads(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"content": f"record number {i}", "id": i})
                                                for i in range(5)))
    cache, loader = None, CountingLoader()
    with pytest.raises(sf.ConfigError, match=r"'content', 'id'.*set TEXT_FIELD"):
        phase1(tmp_path, tmp_path / "a.jsonl", loader=loader)
    with pytest.raises(sf.ConfigError, match=r"the field 'body'.*'content', 'id'"):
        phase1(tmp_path, tmp_path / "a.jsonl", loader=loader, text_field="body")
    assert loader.calls == 0


def test_a_stream_with_no_usable_field_stops_after_a_bounded_number_of_records():
    records = ({"content": "x" * 20} for _ in range(10**9))
    report = sf.DataReport("org/name")
    with pytest.raises(sf.ConfigError, match="none of the 1000 records"):
        list(sf._texts_from_records(enumerate(records), str, report, "auto", None))


def test_text_field_setting_is_checked_and_in_the_notebook():
    names = [f.name for f in __import__("dataclasses").fields(sf.RunConfig)]
    assert names.index("text_field") > names.index("ablation_widths")  # appended after the older settings
    with pytest.raises(sf.ConfigError, match="TEXT_FIELD"):
        sf.make_config(text_field=" text")
    src = Path(sf.__file__).with_name("spoon_feed.py").read_text()
    assert 'TEXT_FIELD = "auto"  # @param' in src and "text_field=TEXT_FIELD" in src
    assert "print(sf.describe_data(cache, tokenizer))" in src  # the Phase 1 cell says what the data gave


# --- errors name the file and the line, before the teacher loads -------------------------------------------------


def write_jsonl_with(tmp_path, line4):
    f = tmp_path / "data.jsonl"
    f.write_text("\n".join([json.dumps({"text": f"good record number {i}"}) for i in range(3)] + [line4] +
                           [json.dumps({"text": "good record number 5"})]) + "\n")
    return f


@pytest.mark.parametrize("line4, match", [
    ('{"text": "broken" oops}', r"data.jsonl: line 4 is not valid JSON"),
    ('"a string"', r"data.jsonl: line 4 is str \"a string\", not an object"),
    ("null", r"data.jsonl: line 4 is null null, not an object"),
    ("42", r"data.jsonl: line 4 is int 42, not an object"),
])
def test_malformed_or_non_object_jsonl_line_is_named_with_its_file_and_line(tmp_path, line4, match):
    f = write_jsonl_with(tmp_path, line4)
    loader = CountingLoader()
    with pytest.raises(sf.ConfigError, match=match):
        phase1(tmp_path, f, loader=loader)
    assert loader.calls == 0


def test_json_array_errors_name_the_line_or_the_record_index(tmp_path):
    (tmp_path / "a.json").write_text('[{"text": "first array record"},\n "not an object"]')
    with pytest.raises(sf.ConfigError, match=r"a.json: record index 1 is str"):
        texts(tmp_path / "a.json")
    (tmp_path / "a.json").write_text('[{"text": "first array record"},\n {"text": oops}]')
    with pytest.raises(sf.ConfigError, match=r"a.json: line 2 column \d+ is not valid JSON"):
        texts(tmp_path / "a.json")


def test_in_memory_records_that_are_not_objects_name_their_index():
    records = enumerate([{"text": "a fine record here"}, "a string", None, 42])
    with pytest.raises(sf.ConfigError, match="org/name record index 1 is str"):
        list(sf._texts_from_records(records, lambda i: f"org/name record index {i}", sf.DataReport("org/name"),
                                    "auto", None))


def test_malformed_csv_and_parquet_name_the_file(tmp_path):
    (tmp_path / "a.csv").write_text("text,id\nfine row of text,1\nbad,row,extra\n")
    with pytest.raises(sf.ConfigError, match=r"a.csv: not a valid CSV file .*line 3"):
        texts(tmp_path / "a.csv")
    (tmp_path / "a.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(sf.ConfigError, match=r"a.parquet: not a valid Parquet file"):
        texts(tmp_path / "a.parquet")


@pytest.mark.parametrize("case", ["unsupported suffix", "empty file", "empty folder", "only unsupported files",
                                  "whitespace only", "header only", "too short", "malformed", "no such glob"])
def test_bad_data_is_reported_before_the_teacher_loads(tmp_path, case):
    d = tmp_path / "d"
    d.mkdir()
    source, match = d, None
    if case == "unsupported suffix":
        source, match = d / "notes.pdf", r"notes.pdf: unsupported suffix '.pdf'"
        source.write_bytes(b"%PDF")
    elif case == "empty file":
        source, match = d / "b.jsonl", r"b.jsonl is empty: fill it, or point DATASET at another file"
        source.write_text("")
    elif case == "empty folder":
        match = r"holds no .txt.*\(it is empty\)"
    elif case == "only unsupported files":
        (d / "a.pdf").write_bytes(b"%PDF")
        match = r"holds no .txt.*\(it has .pdf\)"
    elif case == "whitespace only":
        (d / "a.txt").write_text("\n\n   \n")
        match = "holds no records"
    elif case == "header only":
        (d / "a.csv").write_text("text,id\n")
        match = "holds no records"
    elif case == "too short":
        (d / "a.txt").write_text("the cat")
        match = r"from 0 document\(s\).*shorter than 10 characters.*needs more or longer documents"
    elif case == "malformed":
        (d / "a.jsonl").write_text('{"text": "the cat sat"}\n{oops\n')
        match = r"a.jsonl: line 2 is not valid JSON"
    elif case == "no such glob":
        with pytest.raises(sf.ConfigError, match="no local file or folder matches"):
            tiny_run_config(tmp_path, dataset=str(d / "*.jsonl"))
        return
    loader = CountingLoader()
    with pytest.raises(sf.ConfigError, match=match):
        phase1(tmp_path, source, loader=loader)
    assert loader.calls == 0  # the teacher never loaded


def test_an_empty_file_in_a_folder_is_passed_over_and_a_folder_of_empty_files_is_refused(tmp_path):
    d = write_corpus(tmp_path / "corpus")
    (d / "zz_empty.jsonl").write_text("")
    cache, _ = phase1(tmp_path, d)  # the empty file does not stop the folder
    assert cache.num_train > 0
    e = tmp_path / "empties"
    e.mkdir()
    (e / "a.jsonl").write_text("")
    with pytest.raises(sf.ConfigError, match="holds only empty data files"):
        phase1(tmp_path, e, loader=CountingLoader())


def test_a_single_source_file_that_cannot_fill_held_out_says_why(tmp_path):
    """One .py file is one document: it can never give held-out blocks of its own, and the error says so."""
    f = tmp_path / "one.py"
    f.write_text("\n".join(f"def f{i}(x):\n    return x * {i} + {i}  # the line {i}" for i in range(400)))
    with pytest.raises(sf.ConfigError, match=r"a \.py or \.md file is one document"):
        phase1(tmp_path, f, loader=CountingLoader())


# --- the data report -----------------------------------------------------------------------------------------------


def test_the_data_report_says_what_was_found(tmp_path):
    rows = [{"text": f"record number {i} " + words(20, random.Random(i))} for i in range(40)]
    rows[3] = {"text": "tiny"}
    rows[7] = {"text": None}
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cache, _ = phase1(tmp_path, tmp_path / "a.jsonl", num_samples=8, val_samples=2, batch_size=4)
    tok = make_tokenizer()
    report = sf.describe_data(cache, tok)
    assert "a.jsonl (1 local file via datasets json)" in report
    assert "read 1 of 1 files" in report
    assert f"skipped 1 x shorter than {sf.MIN_TEXT_CHARS} characters (first: {tmp_path / 'a.jsonl'} record index 3)" in report
    assert "skipped 1 x 'text' None or empty" in report
    assert "-> 8 training + 2 held-out blocks of 16 tokens" in report
    assert tok.decode(cache.train_tokens[0].tolist()).splitlines()[0] in report  # the first block, decoded
    assert cache.manifest["data"]["records"] >= 10 and cache.manifest["data"]["tokens"] > 0


# --- 14.3: local data is part of the cache key -------------------------------------------------------------------


def test_editing_a_local_file_rebuilds_the_cache_and_says_why(tmp_path, capsys):
    cfg = tiny_run_config(tmp_path)
    loader = CountingLoader()
    first = sf.cache_teacher_states(cfg, loader=loader, progress=False)
    again = sf.cache_teacher_states(cfg, loader=loader, progress=False)
    assert loader.calls == 1 and again.path == first.path  # unchanged files: reused, the teacher never loads
    doc = Path(cfg.dataset) / "doc003.txt"
    doc.write_text("the dog sat on the log and then it was happy .")
    capsys.readouterr()
    rebuilt = sf.cache_teacher_states(cfg, loader=loader, progress=False)
    out = capsys.readouterr().out
    assert loader.calls == 2
    assert f"rebuilding the cache in {first.path}: 1 local file(s) changed: {doc} modified" in out
    (Path(cfg.dataset) / "doc999.txt").write_text("a new document about the sun and the moon .")
    sf.cache_teacher_states(cfg, loader=loader, progress=False)
    assert loader.calls == 3 and "doc999.txt added" in capsys.readouterr().out
    sf.cache_teacher_states(cfg, loader=loader, progress=False)
    assert loader.calls == 3 and rebuilt.path == first.path


def test_text_field_is_part_of_the_cache_key(tmp_path):
    cfg = tiny_run_config(tmp_path)
    fp = sf.data_fingerprint(cfg.dataset)
    a = sf.cache_request("t", cfg.dataset, 1, 1, 8, 0, "auto", fp)
    b = sf.cache_request("t", cfg.dataset, 1, 1, 8, 0, "content", fp)
    assert sf.cache_folder(cfg.cache_dir, a) != sf.cache_folder(cfg.cache_dir, b)
    assert "listing" not in a["data_files"] and a["data_files"]["files"] == 60


def test_reading_writes_nothing_outside_the_cache_folder(tmp_path, monkeypatch):
    import datasets.config

    home = tmp_path / "hf-home"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text("\n".join(json.dumps({"text": words(30, random.Random(i))})
                                                         for i in range(60)))
    cache, _ = phase1(tmp_path, tmp_path / "data", num_samples=8, val_samples=2, batch_size=4)
    assert not home.exists() or not any(home.rglob("*"))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache.path.name]  # no builder files left behind


# --- issue 27: data as users really have it --------------------------------------------------------------------


def _no_eos(case):
    """A tokenizer without a usable EOS, in each way one can lack it."""
    tok = make_tokenizer()
    if case == "none":
        tok.eos_token = None
    elif case == "not in the vocab, with an unknown token":
        tok.eos_token = "<|endoftext|>"  # maps to <unk>'s id
    else:  # not in the vocab, and no unknown token to map it to
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="the"))
        raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok = PreTrainedTokenizerFast(tokenizer_object=raw)
        tok.eos_token = "<eos>"  # set after construction: not added to the vocabulary, so its id is None
    return tok


@pytest.mark.parametrize("case", ["none", "not in the vocab, with an unknown token", "not in the vocab, no unknown"])
def test_a_tokenizer_without_an_eos_stops_phase_1_before_the_data_is_read_or_the_teacher_loads(tmp_path, case):
    loader = CountingLoader()
    loader.tokenizer = _no_eos(case)
    with pytest.raises(sf.ConfigError, match=r"tokenizer of TEACHER_MODEL='tiny/teacher' (has no EOS token|names "
                                             r"the EOS token .* not in its vocabulary).*joins documents with EOS.*"
                                             r"eos_token"):
        phase1(tmp_path, write_corpus(tmp_path / "corpus"), loader=loader)
    assert loader.calls == 0
    with pytest.raises(sf.ConfigError, match="EOS"):  # pack_blocks itself checks, before reading a document
        sf.pack_blocks(iter(()), loader.tokenizer, 8, 2, 1)


def test_a_local_teacher_folder_whose_tokenizer_has_no_eos_names_the_folder_and_the_fix(tmp_path):
    tok = make_tokenizer()
    tok.eos_token = None
    folder = tmp_path / "my-teacher"
    tok.save_pretrained(folder)
    make_teacher().config.save_pretrained(folder)
    cfg = tiny_run_config(tmp_path, teacher=str(folder))

    def loader():
        raise AssertionError("the teacher loaded")

    with pytest.raises(sf.ConfigError, match=rf"{folder}'? has no EOS token.*\"eos_token\" in tokenizer_config.json"):
        sf.cache_teacher_states(cfg, loader=loader, progress=False)
