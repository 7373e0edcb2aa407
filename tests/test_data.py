"""Your own data: local files through the `datasets` library's packaged builders, every common format, the
TEXT_FIELD rules, errors that name the file and the line, all before the teacher loads (issue 15; 14.3, 14.5)."""
import json
import random
import re
from pathlib import Path

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


def test_reading_local_data_sends_no_request_to_the_hub_even_online(tmp_path, monkeypatch):
    """Online, `datasets` asks the Hub to count a download at every load_dataset call, one round trip a file
    (0.12 s each here: 20 s of Phase 1 for the stdlib corpus's 163 files). Local data counts nothing: no request,
    for any local format, a folder of them, or a saved dataset."""
    import datasets.config
    import datasets.load
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    requests = []

    class Session:  # stands for the network: records what would be sent
        def __getattr__(self, method):
            return lambda url, *a, **kw: requests.append((method, url))

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # as a user with a network has it
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", True)
    monkeypatch.setattr(datasets.load, "get_session", Session)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("a text document here")
    (data / "b.md").write_text("# a markdown document")
    (data / "c.py").write_text("def f():\n    return 1\n")
    (data / "d.jsonl").write_text(json.dumps({"text": "a json line"}) + "\n")
    (data / "e.json").write_text(json.dumps([{"text": "a json array record"}]))
    (data / "f.csv").write_text("text\na csv row of text\n")
    pq.write_table(pa.table({"text": ["a parquet row"]}), data / "g.parquet")
    Dataset.from_dict({"text": ["a saved row"]}).save_to_disk(str(tmp_path / "saved"))
    assert len(texts(data)) == 7 and texts(tmp_path / "saved") == ["a saved row"]
    assert requests == []
    datasets.load.increase_load_count("text")  # the check can fail: the same call outside our reader is sent
    assert requests and requests[0][0] == "head"


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
    assert out == ["<user> hello there\n<assistant> hi, friend\n"]
    # the ShareGPT record renders to the same text, so it is dropped as a duplicate
    assert report.skipped == {sf.DUPLICATE: [1, f"{tmp_path / 'chat.jsonl'} record index 1"]}
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


# item 2: links in a data folder -------------------------------------------------------------------------------


def _link_layout(tmp_path, layout):
    """A data folder (with a.txt) and a folder beside it (other/x.txt), linked in one of the ways users link.
    Returns (DATASET, the texts to be read once each, the reason a left-out path gives, or None)."""
    data, other = tmp_path / "data", tmp_path / "other"
    (data / "sub").mkdir(parents=True)
    other.mkdir()
    (data / "a.txt").write_text("the text of the real file a")
    (data / "sub" / "b.txt").write_text("the text of the real file b")
    (other / "x.txt").write_text("the text behind the link x")
    want = ["the text of the real file a", "the text of the real file b", "the text behind the link x"]
    source, why = data, None
    if layout == "a linked folder":
        (data / "linked").symlink_to("../other")
    elif layout == "a linked file":
        (data / "x.txt").symlink_to("../other/x.txt")
    elif layout == "two links to one folder":
        (data / "l1").symlink_to("../other")
        (data / "l2").symlink_to(other)
        why = "a link to .*l1, read once"
    elif layout == "a loop to a folder above":
        (data / "sub" / "up").symlink_to("../..")  # tmp_path: holds data/ itself
        (data / "sub" / "same").symlink_to("..")  # data/
        want, why = want[:2], "a link loop"
    elif layout == "a broken link":
        (data / "gone.txt").symlink_to("../nowhere.txt")
        want, why = want[:2], "a broken link"
    else:  # a glob whose ** runs round a link loop
        (data / "sub" / "same").symlink_to("..")
        source, want, why = data / "**" / "*.txt", want[:2], "the same file as"
    return source, want, why


@pytest.mark.parametrize("layout", ["a linked folder", "a linked file", "two links to one folder",
                                    "a loop to a folder above", "a broken link", "a glob through a link loop"])
def test_links_are_followed_each_file_is_read_once_and_what_is_left_out_is_reported(tmp_path, layout):
    source, want, why = _link_layout(tmp_path, layout)
    report = sf.DataReport(str(source))
    assert sorted(texts(source, report=report)) == sorted(want)  # every file behind a link, none twice
    said = sf.describe_data(report)
    if why:
        assert report.left_out and all(len(x) == 2 for x in report.left_out)
        assert re.search(why, report.left_out[0][1]) and "left out" in said
    if "link" in layout and why is None:
        assert report.links and "followed 1 link(s)" in said
    fp = sf.data_fingerprint(str(source))  # the cache key covers whatever is read
    assert fp["files"] == len(want)
    if "the text behind the link x" in want:
        (tmp_path / "other" / "x.txt").write_text("the text behind the link, edited later")
        assert sf.data_fingerprint(str(source))["digest"] != fp["digest"]


@pytest.mark.parametrize("how", ["DATASET is the link", "a link inside the data folder", "a link above DATASET",
                                 "a linked file"])
def test_re_pointing_a_link_changes_the_cache_key_even_when_names_sizes_and_times_match(tmp_path, how):
    """v1 and v2 hold files of the same names, sizes and modification times but other text; `current` leads to
    v1, then to v2. Whatever link the reading goes through (to a folder or a file, as DATASET, inside it or on
    the path above it), the key follows the resolved target."""
    import os

    for v, word in (("v1", "alpha"), ("v2", "omega")):
        (tmp_path / v / "sub").mkdir(parents=True)
        (tmp_path / v / "sub" / "a.txt").write_text(f"the text of version {word} here")
        os.utime(tmp_path / v / "sub" / "a.txt", ns=(10**18, 10**18))
    data = tmp_path / "data"
    data.mkdir()
    link, source = {"DATASET is the link": (tmp_path / "current", tmp_path / "current"),
                    "a link inside the data folder": (data / "current", data),
                    "a link above DATASET": (tmp_path / "current", tmp_path / "current" / "sub"),
                    "a linked file": (data / "a.txt", data)}[how]
    target = "{}/sub/a.txt" if how == "a linked file" else "{}"

    def point(v):
        if os.path.lexists(link):
            link.unlink()
        link.symlink_to(tmp_path / target.format(v))

    point("v1")
    before = sf.data_fingerprint(str(source))
    assert texts(source) == ["the text of version alpha here"]
    point("v2")
    after = sf.data_fingerprint(str(source))
    assert texts(source) == ["the text of version omega here"]
    assert (after["files"], after["bytes"]) == (before["files"], before["bytes"])
    assert after["digest"] != before["digest"]


# item 3: file names with glob characters -----------------------------------------------------------------------


@pytest.mark.parametrize("name, decoy", [("a[1].txt", "a1.txt"), ("b*.txt", "bb.txt"), ("c?.txt", "cc.txt"),
                                         ("d]e.txt", "de.txt"), ("[x].jsonl", "x.jsonl"), ("f[!g].csv", "fh.csv")])
def test_a_name_with_glob_characters_is_that_file_in_a_folder_or_named_alone(tmp_path, name, decoy):
    """An existing path is literal, for our own listing and for `datasets`' data_files alike: neither the
    decoy (a file the name would match as a pattern) is read in its place, nor is the file refused."""
    folder = tmp_path / "my[data]*"
    folder.mkdir()

    def write(path, text):
        if path.suffix == ".jsonl":
            path.write_text(json.dumps({"text": text}) + "\n")
        elif path.suffix == ".csv":
            path.write_text(f"text\n{text}\n")
        else:
            path.write_text(text)

    write(folder / name, "the text of the file with the odd name")
    write(folder / decoy, "the text of the decoy file")
    assert sorted(texts(folder)) == ["the text of the decoy file", "the text of the file with the odd name"]
    assert texts(folder / name) == ["the text of the file with the odd name"]
    cfg = tiny_run_config(tmp_path, dataset=str(folder / name))  # accepted, not "no file matches"
    assert list(sf.data_fingerprint(cfg.dataset)["listing"]) == [str(folder / name)]


@pytest.mark.parametrize("name", ["p::q", "zip::x", "a::b", "file::x", "simplecache::a", "file:x", "~t", "a#b"])
@pytest.mark.parametrize("suffix", [".txt", ".md", ".jsonl", ".json", ".csv", ".parquet"])
def test_a_name_fsspec_would_read_as_a_url_is_that_file_alone_in_a_folder_and_in_a_folder_so_named(tmp_path, name,
                                                                                                  suffix):
    """`datasets` hands paths to fsspec, which reads `::` as URL chaining and `name:` as a protocol: an existing
    path is still literal, for every format, named alone (absolute or relative), inside a folder, and as a folder
    whose own name holds them."""
    import pandas as pd

    text = "the text of the file with the url-like name"
    folder = tmp_path / f"corpus{name}v2"
    folder.mkdir()
    path = folder / f"{name}{suffix}"
    if suffix in (".txt", ".md"):
        path.write_text(text)
    elif suffix == ".jsonl":
        path.write_text(json.dumps({"text": text}) + "\n")
    elif suffix == ".json":
        path.write_text(json.dumps([{"text": text}]))
    elif suffix == ".csv":
        pd.DataFrame({"text": [text]}).to_csv(path, index=False)
    else:
        pd.DataFrame({"text": [text]}).to_parquet(path)
    assert texts(path) == [text]
    assert texts(folder) == [text]
    import os

    here = os.getcwd()
    try:
        os.chdir(folder)
        assert texts(path.name) == [text]  # relative: "file:x.txt" is no protocol either
    finally:
        os.chdir(here)
    tiny_run_config(tmp_path, dataset=str(path))  # accepted


def test_a_saved_dataset_in_a_folder_whose_name_holds_double_colons_is_read(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"text": ["the text of the saved dataset"]}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "saved").rename(tmp_path / "saved::v2")  # save_to_disk itself hands the name to fsspec
    assert texts(tmp_path / "saved::v2") == ["the text of the saved dataset"]


# item 4: one huge text file, streamed --------------------------------------------------------------------------


def test_a_txt_file_is_cut_into_documents_as_it_streams(tmp_path):
    """The first document is ready once its own text is read: an endless stream of lines with no blank line
    still gives documents, each at most max_chars, one at a time."""
    import itertools

    rng = random.Random(4)
    endless = ((i, {"text": words(12, rng)}) for i in itertools.count())
    docs = list(itertools.islice(sf._text_documents(endless, 200), 5))
    assert len(docs) == 5 and all(len(d["text"]) <= 200 for _, d in docs)
    assert [i for i, _ in docs] == sorted(i for i, _ in docs)  # in file order: consecutive regions


@pytest.mark.parametrize("layout", ["no blank lines", "no line breaks at all", "windows line ends",
                                    "blank lines of spaces", "paragraphs longer than a document"])
def test_every_layout_of_a_big_txt_file_is_covered_once_in_order(tmp_path, layout):
    rng = random.Random(5)
    lines = [words(rng.randint(3, 30), rng) for _ in range(400)]
    text = {"no blank lines": "\n".join(lines), "no line breaks at all": " ".join(lines),
            "windows line ends": "\r\n\r\n".join(lines), "blank lines of spaces": "\n   \n".join(lines),
            "paragraphs longer than a document": "\n\n".join("\n".join(lines[i:i + 40])
                                                              for i in range(0, 400, 40))}[layout]
    (tmp_path / "big.txt").write_bytes(text.encode())
    docs = texts(tmp_path / "big.txt", max_chars=300)
    assert len(docs) > 20 and all(len(d) <= 300 for d in docs)
    assert " ".join(docs).split() == text.split()  # every word once, in order


# item 5: text in another encoding ------------------------------------------------------------------------------


LEGACY = "café, naïve façade: the cat sat on the mat"  # bytes 0xe9, 0xef, 0xe7 in cp1252, not valid UTF-8


@pytest.mark.parametrize("suffix", [".txt", ".md", ".py", ".csv", ".jsonl", ".json"])
def test_a_file_in_a_legacy_encoding_is_never_read_silently_and_encoding_reads_it(tmp_path, suffix, capsys):
    """Text formats are read with the bad bytes replaced, and the data report (and Phase 1) names the file, the
    count and ENCODING; JSON and CSV stop with one error naming the byte and ENCODING. With ENCODING set to the
    file's encoding, every format reads the text as written."""
    d = tmp_path / "data"
    d.mkdir()
    body = {".csv": f'text\n"{LEGACY}"\n', ".jsonl": json.dumps({"text": LEGACY}, ensure_ascii=False) + "\n",
            ".json": json.dumps([{"text": LEGACY}], ensure_ascii=False)}.get(suffix, LEGACY)
    f = d / f"legacy{suffix}"
    f.write_bytes(body.encode("cp1252"))
    (d / "fine.txt").write_text("plain utf-8 text, nothing to replace")
    report = sf.DataReport(str(d))
    if suffix in (".csv", ".jsonl", ".json"):
        with pytest.raises(sf.ConfigError, match=rf"legacy{suffix}: byte \d+ \(0x(e9|ef|e7)\) is not valid utf-8: set "
                                                 r"ENCODING to the file's encoding"):
            texts(d, report=report)
    else:
        out = texts(d, report=report)
        assert "\ufffd" in out[1] and report.undecodable == {str(f): 3}  # the 3 accented letters, named
        assert "1 file(s) held bytes that are not valid utf-8" in sf.describe_data(report)
        assert "set ENCODING" in sf.describe_data(report) and "fine.txt" not in sf.describe_data(report)
    if suffix == ".json":  # datasets parses a JSON array before the encoding applies: it says so, and the fix
        with pytest.raises(sf.ConfigError, match="a JSON array file must be UTF-8.*or as JSON Lines"):
            texts(d, encoding="cp1252")
        return
    good = texts(d, encoding="cp1252", report=sf.DataReport(str(d)))
    assert LEGACY in good and not any("\ufffd" in t for t in good)
    if suffix == ".txt":  # Phase 1 says so before the teacher loads, and the setting is part of the cache key
        (d / "more.txt").write_text("\n\n".join(words(40, random.Random(i)) for i in range(80)))
        cache, _ = phase1(tmp_path, d)
        assert "Phase 1: note: 1 file(s) held bytes that are not valid utf-8" in capsys.readouterr().out
        again, _ = phase1(tmp_path, d, encoding="cp1252")
        assert again.path != cache.path and again.manifest["data"]["undecodable"] == {}


def test_every_name_of_one_codec_gives_one_cache_key():
    def key(encoding):
        return sf.cache_request("t", "d", 8, 2, 16, encoding=encoding)

    assert key("UTF-8") == key("utf8") == key("utf_8") == key("U8") == key("utf-8")
    assert "encoding" not in key("UTF8")  # the default's key is as before ENCODING existed
    assert key("latin-1") == key("ISO-8859-1") == key("latin1") == key("L1") != key("cp1252") == key("CP1252")


# item 6: duplicate documents -----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["twice in one file", "a copy of a file", "the same text, other whitespace",
                                  "across formats"])
def test_duplicates_are_dropped_before_the_split_so_held_out_shares_no_text_with_training(tmp_path, where):
    rng = random.Random(6)
    docs = [words(30, rng) + " ." for _ in range(40)]
    d = tmp_path / "data"
    d.mkdir()
    if where == "twice in one file":
        (d / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in docs for _ in range(2)))
    elif where == "a copy of a file":
        for i, t in enumerate(docs):
            (d / f"{i:02d}.txt").write_text(t)
            (d / f"{i:02d}-copy.txt").write_text(t)
    elif where == "the same text, other whitespace":
        (d / "a.jsonl").write_text("\n".join(json.dumps({"text": v}) for t in docs for v in (t, f"\n  {t}\n")))
    else:
        (d / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in docs))
        pd = __import__("pandas")
        pd.DataFrame({"text": docs}).to_csv(d / "b.csv", index=False)
    report = sf.DataReport(str(d))
    train, val, _ = sf.pack_blocks(sf.iter_texts(str(d), report=report), make_tokenizer(), seq_len=16,
                                   num_train=200, num_val=8, report=report)  # more than there is: all is read
    assert report.skipped[sf.DUPLICATE][0] == 40 and report.documents == 40
    eos = make_tokenizer().eos_token_id
    assert not sixgrams(train, eos) & sixgrams(val, eos)  # what "held-out documents disjoint" claims
    assert "skipped 40 x the same text as an earlier record" in sf.describe_data(report)


@pytest.mark.parametrize("where", ["a .txt paragraph among others", "a .txt paragraph in two files",
                                  "a .txt paragraph that is also a .jsonl record", "a long .txt paragraph, twice"])
def test_a_repeated_record_is_dropped_before_records_are_grouped_into_documents(tmp_path, where):
    """The record is what the reader reads one at a time: a .txt file's paragraph (grouped into documents only
    after the check), a row, a file. A paragraph repeated among other paragraphs is dropped, however the
    paragraphs around it fall into documents, so it cannot land in both training and held-out."""
    rng = random.Random(6)
    paras = [words(10, rng) + " ." for _ in range(120)]
    dup = "the repeated boilerplate paragraph sat on the mat and then it was happy ."
    if where.startswith("a long"):
        other = random.Random(66)
        dup = "\n".join(words(12, other) for _ in range(12))  # longer than a document: cut in pieces
    body = []
    for i, p in enumerate(paras):
        body.append(p)
        if i % 6 == 0:
            body.append(dup)
    d = tmp_path / "data"
    d.mkdir()
    if where == "a .txt paragraph in two files":
        (d / "a.txt").write_text("\n\n".join(body[:70]))
        (d / "b.txt").write_text("\n\n".join(body[70:]))
    elif where == "a .txt paragraph that is also a .jsonl record":
        (d / "a.jsonl").write_text(json.dumps({"text": dup}) + "\n")
        (d / "b.txt").write_text("\n\n".join(body))
    else:
        (d / "a.txt").write_text("\n\n".join(body))
    tok = make_tokenizer()
    report = sf.DataReport(str(d))
    train, val, _ = sf.pack_blocks(sf.iter_texts(str(d), report=report, max_chars=4 * 16 * 3), tok, seq_len=16,
                                   num_train=400, num_val=40, report=report)  # more than there is: all is read
    repeats = body.count(dup) - (where != "a .txt paragraph that is also a .jsonl record")
    pieces = len(list(sf._text_documents(enumerate({"text": line} for line in dup.split("\n")), 4 * 16 * 3)))
    assert report.skipped[sf.DUPLICATE][0] == repeats * pieces  # each piece of each repeat
    eos = tok.eos_token_id
    assert not sixgrams(train, eos) & sixgrams(val, eos)
    said = sf.describe_data(report)
    assert f"skipped {report.skipped[sf.DUPLICATE][0]} x the same text as an earlier record" in said
    assert "near-duplicates are not detected" in said and "disjoint" not in said  # the claim, no stronger


# item 7: one long document --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["one long .md", "one long .py", "three long .py files", "two long records"])
def test_long_documents_give_as_many_blocks_as_their_length_allows_when_documents_run_out(tmp_path, layout):
    rng = random.Random(7)

    def long_text(n_lines=120):
        return "\n".join(words(12, rng) for _ in range(n_lines))  # ~1,400 tokens: 90 blocks of 16

    d = tmp_path / "data"
    d.mkdir()
    if layout == "one long .md":
        source = d / "book.md"
        source.write_text(long_text())
    elif layout == "one long .py":
        source = d / "module.py"
        source.write_text(long_text())
    elif layout == "three long .py files":
        source = d
        for i in range(3):
            (d / f"m{i}.py").write_text(long_text(40))
    else:
        source = d / "a.jsonl"
        source.write_text("\n".join(json.dumps({"text": long_text(60)}) for _ in range(2)))
    cache, _ = phase1(tmp_path, source, num_samples=24, val_samples=6, seq_len=16)
    assert (cache.num_train, cache.num_val) == (24, 6)  # the cap alone gave at most 4 blocks a document
    eos = make_tokenizer().eos_token_id
    assert not sixgrams(cache.train_tokens, eos) & sixgrams(cache.val_tokens, eos)
    data = cache.manifest["data"]
    assert data["pieces"] > 0 and "was cut into" in sf.describe_data(cache)


def test_enough_documents_use_no_pieces_and_pack_as_before(tmp_path):
    docs = [words(80, random.Random(i)) for i in range(60)]  # each longer than the 4-block cap
    report = sf.DataReport("x")
    train, val, val_docs = sf.pack_blocks(iter(docs), make_tokenizer(), seq_len=8, num_train=60, num_val=6,
                                          report=report)
    assert report.pieces == 0 and val_docs[0] == 9
    tok = make_tokenizer()
    first = tok(docs[0], add_special_tokens=False).input_ids[:32]
    assert train.ravel().tolist()[:33] == first + [tok.eos_token_id]  # a document still gives at most 4 blocks
