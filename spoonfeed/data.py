"""Reading text: local files, saved datasets, the Hub and the stdlib corpus, and the data report."""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import STDLIB_CORPUS
from .errors import ConfigError
from .sources import _local_builder, _plain_alias, _plain_work_dir, data_fingerprint, is_local_dataset, \
    LOCAL_FORMATS, local_data_files  # noqa: F401

TEXT_FIELDS = ("text", "instruction", "messages", "conversations")  # what TEXT_FIELD="auto" looks for, in order


CHAT_FIELDS = ("messages", "conversations")  # chat lists: [{role, content}] or ShareGPT's [{from, value}]


MIN_TEXT_CHARS = 10  # the original's rule: shorter texts are skipped


MAX_DOC_BLOCKS = 4  # a document gives at most this many blocks (pack_blocks), for variety


CHARS_PER_TOKEN = 3  # a low estimate: a .txt document of MAX_DOC_BLOCKS * seq_len * 3 characters fits that cap


FIELD_CHECK_RECORDS = 1000  # after this many records with no usable field, TEXT_FIELD is wrong: stop and say so


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
          "bot": "assistant", "system": "system", "tool": "tool"}


@dataclass
class DataReport:
    """What the data cell found: sources, records read and skipped (with the reason), tokens and blocks.
    Filled by iter_texts and pack_blocks; saved in the cache manifest; printed by describe_data."""

    source: str
    text_field: str = "auto"
    reader: str = ""  # how the source is read, e.g. "1 local file via datasets 'text'"
    files: int = 0  # local files that make up the source
    files_read: int = 0  # of which reading reached this many (it stops once the blocks are full)
    ignored: list = dataclasses.field(default_factory=list)  # files in a folder/glob with no supported suffix
    left_out: list = dataclasses.field(default_factory=list)  # [path, why]: link loops, second ways in, broken links
    links: list = dataclasses.field(default_factory=list)  # [path, target] of the links followed
    encoding: str = "utf-8"  # what local text files were decoded with (ENCODING)
    undecodable: dict = dataclasses.field(default_factory=dict)  # path -> bytes not valid in `encoding` (replaced)
    records: int = 0  # records (rows, paragraphs, files) read
    documents: int = 0  # texts handed to the packer
    chat_rendered: str = ""  # "the tokenizer's chat template" or "plain (the tokenizer has no chat template)"
    skipped: dict = dataclasses.field(default_factory=dict)  # reason -> [count, where the first one was]
    fields: list = dataclasses.field(default_factory=list)  # fields the records have (with a value)
    has_field: int = 0  # records that hold the wanted field with a value
    exhausted: bool = False  # the whole source was read
    tokens: int = 0  # tokens of the documents the packer took (after the per-document cap)
    train_blocks: int = 0
    val_blocks: int = 0
    seq_len: int = 0
    long_documents: int = 0  # documents longer than the per-document cap, continued when the documents ran out
    pieces: int = 0  # pieces of those continuations that were packed (each a disjoint region of its document)

    def skip(self, reason: str, where: str) -> None:
        count = self.skipped.setdefault(reason, [0, where])
        count[0] += 1

    def field_summary(self) -> str:
        fields = ", ".join(repr(f) for f in self.fields[:20]) or "none"
        return f"the records have the fields {fields}"


def _missing(value) -> bool:
    """None, an empty or blank string and an empty list all count as a missing field."""
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, (list, tuple)) and len(value) == 0)


def _chat_messages(value) -> list[dict] | None:
    """A chat list as [{role, content}]: OpenAI-style [{role, content}] or ShareGPT-style [{from, value}].
    Messages with no content are dropped. None when the list is not a chat."""
    out = []
    for m in value:
        if not isinstance(m, dict):
            return None
        role = m.get("role") if m.get("role") is not None else m.get("from")  # Arrow rows carry both keys, one None
        content = m.get("content") if m.get("content") is not None else m.get("value")
        if not isinstance(role, str) or not (content is None or isinstance(content, str)):
            return None
        if not _missing(content):
            out.append({"role": _ROLES.get(role.lower(), role), "content": content})
    return out or None


def _render_chat(messages: list[dict], tokenizer) -> tuple[str | None, str | None]:
    """(text, None) or (None, why). With the tokenizer's chat template when it has one, else the contents
    joined by newlines."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False), None
        except Exception as e:  # jinja2 TemplateError, e.g. "roles must alternate"
            return None, f"the chat template refused it ({str(e)[:80]})"
    return "\n".join(m["content"] for m in messages), None


def _record_text(item: dict, text_field: str = "auto", tokenizer=None) -> tuple[str | None, str | None]:
    """(text, None), or (None, why the record is skipped). See record_text for the rules."""
    if text_field == "auto":
        if not _missing(item.get("text")):
            field, value = "text", item["text"]
        elif not _missing(item.get("instruction")):
            field, value = "instruction", item["instruction"]
            response = item.get("response")
            if isinstance(value, str) and not _missing(response):
                if not isinstance(response, str):
                    return None, f"response is a {type(response).__name__}, not text"
                value = f"{value}\n{response}"
        else:
            field = next((k for k in CHAT_FIELDS if not _missing(item.get(k))), None)
            if field is None:
                empty = [k for k in TEXT_FIELDS if k in item]
                return None, (f"{'/'.join(repr(k) for k in empty)} None or empty" if empty else
                              "no 'text', 'instruction' or chat ('messages', 'conversations') field")
            value = item[field]
    else:
        field, value = text_field, item.get(text_field)
        if _missing(value):
            return None, f"{text_field!r} None or empty" if text_field in item else f"no {text_field!r} field"
    if isinstance(value, (list, tuple)):
        messages = _chat_messages(value)
        if messages is None:
            return None, f"{field} is a list but not a chat (a list of {{role, content}} messages)"
        value, why = _render_chat(messages, tokenizer)
        if value is None:
            return None, why
    if not isinstance(value, str):
        return None, f"{field} is a {type(value).__name__}, not text"
    if len(value) < MIN_TEXT_CHARS:
        return None, f"shorter than {MIN_TEXT_CHARS} characters"
    return value, None


def record_text(item: dict, text_field: str = "auto", tokenizer=None) -> str | None:
    """The text of one record (a dict), or None when it has none.

    text_field="auto" (TEXT_FIELD's default) takes `text`; else `instruction` + "\\n" + `response` (the
    response when it has one); else a chat list (`messages` or `conversations`), rendered with the
    tokenizer's chat template when it has one. Any other name takes that field (a string or a chat list).
    None, empty and blank fields count as missing. Texts under MIN_TEXT_CHARS characters are skipped.
    """
    return _record_text(item, text_field, tokenizer)[0]


DUPLICATE = "the same text as an earlier record"  # the data report's reason for a dropped duplicate


# what the split guarantees, as the data report says it: held-out and training take different documents (or
# disjoint pieces of one), and a record (a .txt paragraph, a row, a file) whose exact text (stripped) was read
# before is dropped before the split. Near-duplicates (one word changed) are not detected.
RECORD_CLAIM = "a record repeated with the same text is read once (near-duplicates are not detected)"


SPLIT_CLAIM = f"held-out from other documents than training, and {RECORD_CLAIM}"


def _digest(text: str) -> bytes:
    """What two texts share when they are duplicates: their content, stripped."""
    return hashlib.blake2b(text.strip().encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _texts_from_records(records, where, report: DataReport, text_field: str, tokenizer, given: set | None = None,
                        dedup: bool = True):
    """Texts from (index, record) pairs; where(index) names a record in errors and in the report. A text whose
    content (stripped) was already given is dropped and counted as skipped (DUPLICATE), so that no text lands in
    both training and held-out; `given` holds the digests of the texts given so far (shared across files).
    dedup=False: the records are already de-duplicated (a .txt file's documents, whose paragraphs were).
    Raises ConfigError for a record that is not an object, and when FIELD_CHECK_RECORDS records hold no
    usable field (the message lists the fields they do have)."""
    given = set() if given is None else given
    wanted = TEXT_FIELDS if text_field == "auto" else (text_field,)
    seen = dict.fromkeys(report.fields)
    for i, item in records:
        if not isinstance(item, dict):
            raise ConfigError(f"{where(i)} is {type(item).__name__} {str(item)[:40]!r}, not an object with a text "
                              "field: fix or remove that record")
        report.records += 1
        seen.update((k, None) for k, v in item.items() if not _missing(v) and k not in seen)
        if any(not _missing(item.get(k)) for k in wanted):
            report.has_field += 1
        text, why = _record_text(item, text_field, tokenizer)
        digest = None if text is None or not dedup else _digest(text)
        if digest is not None and digest in given:
            text, why = None, DUPLICATE
        if text is None:
            report.skip(why, where(i))
        else:
            given.add(digest)
            if any(isinstance(item.get(k), (list, tuple)) for k in wanted) and not report.chat_rendered:
                report.chat_rendered = ("the tokenizer's chat template" if getattr(tokenizer, "chat_template", None)
                                        else "plain text (the tokenizer has no chat template)")
            report.documents += 1
            yield text
        if report.records == FIELD_CHECK_RECORDS and report.has_field == 0:
            report.fields = list(seen)
            _no_field_error(report)
    report.fields = list(seen)


def _no_field_error(report: DataReport):
    want = ("a 'text', 'instruction' or chat ('messages', 'conversations') field" if report.text_field == "auto"
            else f"the field {report.text_field!r}")
    raise ConfigError(f"none of the {report.records} records read from {report.source} has {want} with a value "
                      f"(None and empty count as missing); {report.field_summary()}: set TEXT_FIELD to the one "
                      "that holds the text")


def _split_text(text: str, max_chars: int):
    """Consecutive, disjoint pieces of a text, each of at most max_chars: cut at a line end, else at a space, else
    anywhere; the whitespace at a cut is dropped. Linear in len(text): each cut looks at one window."""
    start, n = 0, len(text)
    while n - start > max_chars:
        end = start + max_chars
        cut = text.rfind("\n", start, end + 1)
        if cut <= start + max_chars // 2:
            cut = text.rfind(" ", start, end + 1)
        if cut <= start + max_chars // 2:
            cut = end
        yield text[start:cut]
        start = cut
        while start < n and text[start].isspace():
            start += 1
    if start < n:
        yield text[start:]


def _text_documents(lines, max_chars: int, repeated=None):
    """(line index, {"text": document}) pairs from the (line index, {"text": line}) pairs of one .txt file, as
    they stream: paragraphs (lines between blank lines) joined by a blank line into documents of at most
    max_chars characters. A longer paragraph is cut at line ends, a longer line at a space. The documents are
    consecutive, disjoint regions of the file, and the first is ready once its text is read: the work is linear
    in the file's length, blank lines or none.
    repeated(text, line index) -> bool: called on each paragraph (each piece of a paragraph longer than a
    document) before it joins a document; True drops it. A paragraph is the record of a .txt file, so duplicates
    are dropped paragraph by paragraph (iter_texts), before grouping and so before the split."""
    doc, doc_len, doc_first = [], 0, 0  # whole paragraphs of the document being built
    para, para_len, para_first = [], -1, 0  # lines of the paragraph being read (para_len counts the "\n"s)
    repeated = repeated or (lambda text, i: False)

    def end_paragraph():  # -> the document it completes, or None
        nonlocal doc, doc_len, doc_first, para, para_len
        done = None
        if para:
            text = "\n".join(para)
            if repeated(text, para_first):
                para, para_len = [], -1
                return None
            if doc and doc_len + 2 + len(text) > max_chars:
                done, doc = (doc_first, {"text": "\n\n".join(doc)}), []
            if not doc:
                doc_first, doc_len = para_first, -2
            doc.append(text)
            doc_len += 2 + len(text)
        para, para_len = [], -1
        return done

    for i, row in lines:
        line = row["text"]
        if not line.strip():
            done = end_paragraph()
            if done:
                yield done
            continue
        for piece in _split_text(line.rstrip() if para else line.strip(), max_chars):
            if para and para_len + 1 + len(piece) > max_chars:  # a long paragraph: what fits is a document
                if doc:
                    yield doc_first, {"text": "\n\n".join(doc)}
                    doc = []
                text = "\n".join(para)
                if not repeated(text, para_first):
                    yield para_first, {"text": text}
                para, para_len = [], -1
            if not para:
                para_first = i
            para.append(piece)
            para_len += 1 + len(piece)
    done = end_paragraph()
    if done:
        yield done
    if doc:
        yield doc_first, {"text": "\n\n".join(doc)}


def _describe_json_value(value) -> str:
    return f"{type(value).__name__ if value is not None else 'null'} {json.dumps(value)[:40]}"


def _is_json_array(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


def _json_problem(path: str, encoding: str = "utf-8") -> str | None:
    """Where a .json/.jsonl file stops being JSON objects: "line 4 is not valid JSON (...)", "line 2 is null
    null, not an object ...", "record index 1 is str ...", or None when every record is an object."""
    with open(path, encoding=encoding, errors="replace") as f:
        is_array = f.read(4096).lstrip().startswith("[")
    if is_array:  # one JSON array
        try:
            rows = json.loads(Path(path).read_text(encoding=encoding, errors="replace"))
        except json.JSONDecodeError as e:
            return f"line {e.lineno} column {e.colno} is not valid JSON ({e.msg})"
        for i, row in enumerate(rows if isinstance(rows, list) else []):
            if not isinstance(row, dict):
                return f"record index {i} is {_describe_json_value(row)}, not an object with a text field"
        return None
    with open(path, encoding=encoding, errors="replace") as f:  # JSON Lines, read a line at a time
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {n} is not valid JSON ({e.msg}, column {e.colno})"
            if not isinstance(row, dict):
                return f"line {n} is {_describe_json_value(row)}, not an object with a text field"
    return None


_DATA_FIX = "fix or remove it, or leave the file out of DATASET"


def _decode_problem(path: str, encoding: str) -> str | None:
    """Where a file stops being text in `encoding`: "byte 1,204 (0xe9) is not valid utf-8", or None."""
    decoder, offset = codecs.getincrementaldecoder(encoding)(), 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            held = len(decoder.getstate()[0])  # bytes of a sequence the last chunk left unfinished
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                return f"byte {offset - held + e.start:,} (0x{e.object[e.start]:02x}) is not valid {encoding}"
            if not chunk:
                return None
            offset += len(chunk)


def _data_error(path: str, builder: str, err: Exception, encoding: str = "utf-8") -> ConfigError:
    """One ConfigError that names the file and the line (or record index) a builder's error came from; for bytes
    that are not text in `encoding`, the byte and the ENCODING setting."""
    if isinstance(err, OSError):
        return ConfigError(f"{path} cannot be read ({err.strerror or err}): {_DATA_FIX}")
    problem = _decode_problem(path, encoding) if builder != "parquet" else None
    if problem:
        return ConfigError(f"{path}: {problem}: set ENCODING to the file's encoding (now {encoding!r}; for example "
                           "'cp1252' or 'latin-1'), or save the file as UTF-8")
    if builder == "json" and encoding.replace("_", "-").lower() not in ("utf-8", "utf8") and _is_json_array(path):
        return ConfigError(f"{path}: a JSON array file must be UTF-8 (datasets' json reader parses an array before "
                           f"ENCODING={encoding!r} applies): save it as UTF-8, or as JSON Lines (.jsonl, which "
                           "ENCODING reads)")
    problem = _json_problem(path, encoding) if builder == "json" else None
    if problem:
        return ConfigError(f"{path}: {problem}: {_DATA_FIX}")
    what = {"json": "JSON or JSON Lines", "csv": "CSV", "parquet": "Parquet", "text": "text"}[builder]
    return ConfigError(f"{path}: not a valid {what} file ({type(err).__name__}: {str(err).strip()[:200]}): {_DATA_FIX}")


_UNDECODABLE = [0]  # bytes the "spoonfeed.replace" error handler has replaced so far, in this process


def _replace_and_count(err: UnicodeError):
    """codecs error handler: what errors="replace" does on decoding (U+FFFD for each undecodable sequence), and
    count the bytes, so that the data report can say which text files held how many."""
    if not isinstance(err, UnicodeDecodeError):
        raise err
    _UNDECODABLE[0] += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("spoonfeed.replace", _replace_and_count)


def _file_records(path: str, work_dir: str, encoding: str = "utf-8"):
    """(index, record) pairs of one local file, read lazily by the `datasets` packaged builder for its suffix
    (streaming: no Arrow copy of the data is written; the builder's lock files go to work_dir). The file is read
    through a plain-named link (_plain_alias): `datasets` hands paths to fsspec, which reads ::, a protocol:
    prefix and glob characters in a name as URL syntax and patterns, so an existing path is kept literal.
    Text files are decoded with `encoding`, undecodable bytes replaced and counted (_UNDECODABLE); JSON and CSV
    files with `encoding`, strictly."""
    from datasets import load_dataset

    builder, kw = LOCAL_FORMATS[Path(path).suffix.lower()]
    if builder in ("text", "json", "csv"):
        kw = {**kw, "encoding": encoding, **({"encoding_errors": "spoonfeed.replace"} if builder == "text" else {})}
    try:
        with _local_builder():
            ds = load_dataset(builder, data_files=[_plain_alias(path, work_dir)], split="train", streaming=True,
                              cache_dir=work_dir, **kw)
            checked = builder != "json"
            for i, item in enumerate(ds):
                if not checked and all(v is None for v in item.values()):
                    checked = True  # the json builder reads a `null` line as a record of Nones: find the line
                    problem = _json_problem(path, encoding)
                    if problem:
                        raise ConfigError(f"{path}: {problem}: {_DATA_FIX}")
                yield i, item
    except ConfigError:
        raise
    except Exception as e:  # ArrowInvalid, pandas ParserError, UnicodeDecodeError, OSError ... one clear error
        raise _data_error(path, builder, e, encoding) from e


def _repeated(text: str, where: str, seen: set, report: DataReport) -> bool:
    """Whether a .txt paragraph repeats a record already given (seen: their digests); a repeat is counted as
    skipped (DUPLICATE, where it was), a new one joins seen."""
    digest = _digest(text)
    if digest in seen:
        report.skip(DUPLICATE, where)
        return True
    seen.add(digest)
    return False


def _saved_records(path: str, report: DataReport, work_dir: str):
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(_plain_alias(path, work_dir))  # memory-mapped Arrow: nothing is copied
    if isinstance(ds, DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        report.reader += f", split {split!r}"
        ds = ds[split]
    yield from enumerate(ds)


def iter_texts(source: str, seed: int = 0, text_field: str = "auto", tokenizer=None, report: DataReport | None = None,
               max_chars: int = MAX_DOC_BLOCKS * 128 * CHARS_PER_TOKEN, work_dir: str | None = None,
               encoding: str = "utf-8"):
    """Documents (str) from a dataset, read lazily: the caller stops once it has enough.

    - `stdlib`: the Python standard library's .py files, one document each, in a fixed shuffled order (seed).
    - A local file, folder (links followed, loops guarded) or glob (local_data_files; a path that exists is
      literal, glob characters and all), through the `datasets` packaged builders (LOCAL_FORMATS): .txt (read a
      line at a time and grouped at blank lines into documents of at most max_chars characters as it streams:
      _text_documents), .py and .md (whole documents), .json/.jsonl (JSON Lines or a JSON array), .csv and
      .parquet; a folder written by save_to_disk (load_from_disk). Local text is decoded with `encoding`
      (ENCODING; the stdlib is UTF-8): a text file's undecodable bytes are replaced (U+FFFD) and counted in
      report.undecodable; a JSON or CSV file that is not valid in it is a ConfigError naming ENCODING.
    - Anything else: a Hub dataset, streamed.
    Records become text by record_text's rules (text_field, the tokenizer's chat template). A record (a .txt
    paragraph, before grouping; a row; a file) whose text was already given is dropped (DUPLICATE in the report).
    `report` is filled as reading goes. work_dir holds the builders' lock files and the links files are read
    through while reading (a temporary folder inside it, removed after); None: the system's temporary folder.
    Raises ConfigError (naming the file and line, or the record index) for an unsupported or empty file, a
    malformed record, a record that is not an object, and a source where no record has the wanted field.
    """
    import tempfile

    report = report if report is not None else DataReport(source, text_field)
    if not is_local_dataset(source):
        report.reader = "Hub dataset, streamed"
        yield from _iter_hub_texts(source, report, text_field, tokenizer)
        return
    files, report.ignored, report.left_out, report.links = local_data_files(source)
    if source == STDLIB_CORPUS:
        random.Random(seed).shuffle(files)  # a fixed, varied order: not 500 blocks of one package
        encoding = "utf-8"  # Python source is UTF-8 (PEP 3120)
    report.encoding = encoding
    report.files = len(files)
    if len(files) == 1 and os.path.isdir(files[0]):
        report.reader = "a save_to_disk folder, via datasets.load_from_disk"
    else:
        builders = sorted({LOCAL_FORMATS[Path(f).suffix.lower()][0] for f in files})
        report.reader = f"{len(files)} local file{'s' * (len(files) != 1)} via datasets {', '.join(builders)}"
    if work_dir:
        os.makedirs(work_dir, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="spoonfeed-datasets-", dir=_plain_work_dir(work_dir))
    seen = set()  # digests of the texts given so far: a duplicate is dropped, whichever file it is in
    try:
        for path in files:
            report.files_read += 1
            fmt, before = None if os.path.isdir(path) else LOCAL_FORMATS[Path(path).suffix.lower()], _UNDECODABLE[0]
            records = _saved_records(path, report, tmp.name) if fmt is None else _file_records(path, tmp.name, encoding)
            try:
                if fmt and fmt[0] == "text":  # a text file's documents are its text, whatever TEXT_FIELD says
                    lines = fmt[1]["sample_by"] == "line"
                    where = (lambda i, p=path: f"{p} line {i + 1}") if lines else (lambda i, p=path: p)
                    if lines:  # the record is the paragraph: duplicates go before paragraphs become documents
                        records = _text_documents(records, max_chars, lambda text, i, w=where: _repeated(
                            text, w(i), seen, report))
                    yield from _texts_from_records(records, where, report, "text", tokenizer, seen, dedup=not lines)
                else:
                    yield from _texts_from_records(records, lambda i, p=path: f"{p} record index {i}", report,
                                                   text_field, tokenizer, seen)
            finally:  # also when the caller stops reading half-way through this file
                if _UNDECODABLE[0] > before:
                    report.undecodable[path] = _UNDECODABLE[0] - before
        report.exhausted = True
        if report.records == 0:
            raise ConfigError(f"{source} holds no records: point DATASET at a file or folder with text")
        if report.has_field == 0:
            _no_field_error(report)
    finally:
        tmp.cleanup()


def _iter_hub_texts(name: str, report: DataReport, text_field: str = "auto", tokenizer=None):
    from datasets import load_dataset

    try:
        stream = load_dataset(name, split="train", streaming=True)
    except Exception as e:  # the datasets library raises many types for "not found" and "offline"
        raise ConfigError(f"could not open dataset {name!r} ({type(e).__name__}: {str(e)[:200]}). Offline, use "
                          f"DATASET = {STDLIB_CORPUS!r} or a local file or folder ({', '.join(LOCAL_FORMATS)})") from e
    yield from _texts_from_records(enumerate(stream), lambda i: f"{name} record index {i}", report, text_field,
                                   tokenizer, set())
    report.exhausted = True
    if report.records and report.has_field == 0:
        _no_field_error(report)


def undecodable_note(report) -> str | None:
    """One line naming the text files that held bytes not valid in their encoding (replaced by U+FFFD), how many
    bytes, and the ENCODING fix; None when there were none. Takes a DataReport or its dict (a manifest's)."""
    d = asdict(report) if isinstance(report, DataReport) else report
    bad = d.get("undecodable") or {}
    if not bad:
        return None
    files = ", ".join(f"{os.path.basename(f)} ({n:,} bytes)" for f, n in list(bad.items())[:5])
    return (f"{len(bad)} file(s) held bytes that are not valid {d.get('encoding', 'utf-8')}, read as U+FFFD: {files}"
            + (" ..." if len(bad) > 5 else "") + ". If they are in another encoding, set ENCODING to it (for example "
            "'cp1252' or 'latin-1') and rerun")


def describe_data(cache_or_report, tokenizer=None) -> str:
    """What Phase 1's data gave, as the notebook prints it: the source and how it was read, files ignored or left
    out (and why) and links followed, records read and skipped (with the reason and where the first one was;
    duplicates included), files with undecodable bytes, tokens, blocks, and the first training block decoded.
    Takes a TeacherCache (its manifest keeps the report) or a DataReport."""
    if isinstance(cache_or_report, DataReport):
        d, first = asdict(cache_or_report), None
    else:
        d, first = cache_or_report.manifest.get("data"), cache_or_report.train_tokens[0]
        if d is None:
            return "data: this cache was built before data reports were kept (rebuild it to get one)"

    def some(items, show):
        return ", ".join(show(x) for x in items[:5]) + (" ..." if len(items) > 5 else "")

    lines = [f"data: {d['source']} ({d['reader']})"]
    if d["ignored"]:
        lines.append(f"  ignored {len(d['ignored'])} file(s) with no supported suffix: "
                     + some(d["ignored"], os.path.basename))
    if d.get("links"):
        lines.append(f"  followed {len(d['links'])} link(s): " + some(d["links"], lambda x: f"{x[0]} -> {x[1]}"))
    if d.get("left_out"):
        lines.append(f"  left out {len(d['left_out'])} path(s): " + some(d["left_out"], lambda x: f"{x[0]} ({x[1]})"))
    read = f"{d['files_read']} of {d['files']} files, " if d["files"] else ""
    stop = "all of it" if d["exhausted"] else "stopped once the blocks were full"
    skipped = sum(n for n, _ in d["skipped"].values())
    lines.append(f"  read {read}{d['records']:,} records ({stop}): {d['documents']:,} documents, {skipped:,} skipped"
                 + (f"; TEXT_FIELD = {d['text_field']!r}" if d["text_field"] != "auto" else ""))
    for why, (n, where) in sorted(d["skipped"].items(), key=lambda kv: -kv[1][0]):
        lines.append(f"    skipped {n:,} x {why} (first: {where})" + (" (dropped before the split)" if why == DUPLICATE
                                                                        else ""))
    note = undecodable_note(d)
    if note:
        lines.append(f"  {note}")
    if d["chat_rendered"]:
        lines.append(f"  chat lists rendered with {d['chat_rendered']}")
    split = SPLIT_CLAIM
    if d.get("pieces"):
        split = (f"the documents ran out, so the rest of {d['long_documents']} long one(s) was cut into "
                 f"{d['pieces']} pieces; held-out from other documents and pieces than training, and {RECORD_CLAIM}")
    lines.append(f"  {d['tokens']:,} tokens -> {d['train_blocks']} training + {d['val_blocks']} held-out blocks of "
                 f"{d['seq_len']} tokens (documents joined by EOS; {split})")
    if first is not None and tokenizer is not None:
        text = tokenizer.decode(first.tolist())
        lines.append("  first training block, decoded:")
        lines += ["    | " + line for line in text.splitlines()[:12]]
    return "\n".join(lines)
