"""Reading text (local files, saved datasets, the Hub, the stdlib corpus) and packing it into token blocks."""

from __future__ import annotations

import dataclasses
import glob as globlib
import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .config import STDLIB_CORPUS
from .errors import ConfigError

TEXT_FIELDS = ("text", "instruction", "messages", "conversations")  # what TEXT_FIELD="auto" looks for, in order


CHAT_FIELDS = ("messages", "conversations")  # chat lists: [{role, content}] or ShareGPT's [{from, value}]


MIN_TEXT_CHARS = 10  # the original's rule: shorter texts are skipped


MAX_DOC_BLOCKS = 4  # a document gives at most this many blocks (pack_blocks), for variety


CHARS_PER_TOKEN = 3  # a low estimate: a .txt document of MAX_DOC_BLOCKS * seq_len * 3 characters fits that cap


FIELD_CHECK_RECORDS = 1000  # after this many records with no usable field, TEXT_FIELD is wrong: stop and say so


# local file suffix -> the `datasets` packaged builder that reads it, and its config
LOCAL_FORMATS = {
    ".txt": ("text", {"sample_by": "paragraph", "encoding_errors": "replace"}),  # paragraphs, regrouped below
    ".md": ("text", {"sample_by": "document", "encoding_errors": "replace"}),  # a whole file is one document
    ".py": ("text", {"sample_by": "document", "encoding_errors": "replace"}),
    ".json": ("json", {}),  # JSON Lines, or one JSON array of objects
    ".jsonl": ("json", {}),
    ".csv": ("csv", {}),
    ".parquet": ("parquet", {}),
}


_DOCUMENT_SUFFIXES = (".py", ".md")  # source files: an empty one (an empty __init__.py) is normal, not an error


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


def _texts_from_records(records, where, report: DataReport, text_field: str, tokenizer):
    """Texts from (index, record) pairs; where(index) names a record in errors and in the report.
    Raises ConfigError for a record that is not an object, and when FIELD_CHECK_RECORDS records hold no
    usable field (the message lists the fields they do have)."""
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
        if text is None:
            report.skip(why, where(i))
        else:
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


def _split_text(text: str, max_chars: int) -> list[str]:
    """Cut a long text into consecutive, disjoint pieces of at most max_chars: at a line end, else at a
    space, else anywhere."""
    pieces = []
    while len(text) > max_chars:
        cut = text.rfind("\n", 0, max_chars + 1)
        if cut <= max_chars // 2:
            cut = text.rfind(" ", 0, max_chars + 1)
        if cut <= max_chars // 2:
            cut = max_chars
        pieces.append(text[:cut])
        text = text[cut:].lstrip()
    return pieces + [text] if text else pieces


def _paragraph_documents(paragraphs, max_chars: int):
    """(index, document) pairs from (index, {"text": paragraph}) pairs of one .txt file: consecutive
    paragraphs joined by a blank line into documents of at most max_chars characters; a longer paragraph
    (a file with no blank lines) is cut into chunks at line ends. The documents are disjoint regions."""
    buf, size, first = [], 0, 0
    for i, row in paragraphs:
        for piece in _split_text(row["text"].strip(), max_chars):
            if buf and size + len(piece) > max_chars:
                yield first, {"text": "\n\n".join(buf)}
                buf, size = [], 0
            if not buf:
                first = i
            buf.append(piece)
            size += len(piece) + 2
    if buf:
        yield first, {"text": "\n\n".join(buf)}


def _is_saved_dataset(path) -> bool:
    """A folder written by Dataset.save_to_disk (state.json) or DatasetDict.save_to_disk (dataset_dict.json)."""
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def _stdlib_files() -> list[str]:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(str(p) for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def is_local_dataset(source: str) -> bool:
    """True for the stdlib corpus and for an existing local file, folder or glob; False for a Hub id."""
    path = os.path.expanduser(source)
    return source == STDLIB_CORPUS or os.path.exists(path) or bool(globlib.glob(path, recursive=True))


def local_data_files(source: str) -> tuple[list[str], list[str]]:
    """(files to read, files ignored) for a local source, in reading order (sorted; the stdlib unshuffled).

    A file must have a supported suffix (LOCAL_FORMATS); a folder or glob skips the others, and they are
    listed as ignored. Hidden files and folders are left out. A folder written by save_to_disk is one entry.
    Raises ConfigError for an unsupported single file, a folder or glob with no supported file, and an empty
    data file (an empty .py/.md is read, and skipped as too short).
    """
    if source == STDLIB_CORPUS:
        return _stdlib_files(), []
    path = os.path.expanduser(source)
    supported = ", ".join(LOCAL_FORMATS)
    if os.path.isfile(path):
        if Path(path).suffix.lower() not in LOCAL_FORMATS:
            raise ConfigError(f"{path}: unsupported suffix {Path(path).suffix or '(none)'!r}. DATASET takes {supported} "
                              "files, a folder or glob of them, or a folder written by Dataset.save_to_disk")
        candidates = [path]
    elif os.path.isdir(path) and _is_saved_dataset(path):
        return [path], []
    else:
        root = Path(path) if os.path.isdir(path) else None
        found = root.rglob("*") if root else map(Path, globlib.glob(path, recursive=True))
        candidates = sorted(str(p) for p in found if p.is_file() and not any(
            part.startswith(".") for part in (p.relative_to(root) if root else p).parts))
    files = [f for f in candidates if Path(f).suffix.lower() in LOCAL_FORMATS]
    ignored = [f for f in candidates if f not in set(files)]
    if not files:
        suffixes = sorted({Path(f).suffix or "(none)" for f in ignored})
        raise ConfigError(f"{source} holds no {supported} file" + (f" (it has {', '.join(suffixes)})" if suffixes else
                          " (it is empty)") + ": point DATASET at your data files")
    empty = [f for f in files if os.path.getsize(f) == 0 and Path(f).suffix.lower() not in _DOCUMENT_SUFFIXES]
    if empty and os.path.isfile(path):  # the one file DATASET names
        raise ConfigError(f"{empty[0]} is empty: fill it, or point DATASET at another file")
    files = [f for f in files if f not in set(empty)]  # in a folder or glob an empty data file is passed over
    if not files:
        raise ConfigError(f"{source} holds only empty data files ({', '.join(empty[:3])}): fill them, or point "
                          "DATASET at your data")
    return files, ignored


def data_fingerprint(source: str) -> dict | None:
    """What the local files of a dataset hold, for the Phase 1 cache key: {"files": n, "bytes": total size,
    "digest": hash of every file's path, size and modification time (ns)}, with "listing" {path: [size,
    mtime_ns]} for saying what changed. Editing, adding or removing a file changes the digest. None for a Hub
    dataset. Raises ConfigError as local_data_files does."""
    if not is_local_dataset(source):
        return None
    files, _ = local_data_files(source)
    if len(files) == 1 and os.path.isdir(files[0]):  # save_to_disk folder: every file in it
        files = sorted(str(p) for p in Path(files[0]).rglob("*") if p.is_file())
    listing = {}
    for f in files:
        st = os.stat(f)
        listing[f] = [st.st_size, st.st_mtime_ns]
    digest = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:16]
    return {"files": len(listing), "bytes": sum(v[0] for v in listing.values()), "digest": digest, "listing": listing}


class _quiet_datasets:
    """The datasets builders log an error line before raising; we raise one clear ConfigError instead."""

    def __enter__(self):
        import logging

        self.logger = logging.getLogger("datasets")
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def _describe_json_value(value) -> str:
    return f"{type(value).__name__ if value is not None else 'null'} {json.dumps(value)[:40]}"


def _json_problem(path: str) -> str | None:
    """Where a .json/.jsonl file stops being JSON objects: "line 4 is not valid JSON (...)", "line 2 is null
    null, not an object ...", "record index 1 is str ...", or None when every record is an object."""
    with open(path, encoding="utf-8", errors="replace") as f:
        is_array = f.read(4096).lstrip().startswith("[")
    if is_array:  # one JSON array
        try:
            rows = json.loads(Path(path).read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError as e:
            return f"line {e.lineno} column {e.colno} is not valid JSON ({e.msg})"
        for i, row in enumerate(rows if isinstance(rows, list) else []):
            if not isinstance(row, dict):
                return f"record index {i} is {_describe_json_value(row)}, not an object with a text field"
        return None
    with open(path, encoding="utf-8", errors="replace") as f:  # JSON Lines, read a line at a time
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


def _data_error(path: str, builder: str, err: Exception) -> ConfigError:
    """One ConfigError that names the file and the line (or record index) a builder's error came from."""
    if isinstance(err, OSError):
        return ConfigError(f"{path} cannot be read ({err.strerror or err}): {_DATA_FIX}")
    problem = _json_problem(path) if builder == "json" else None
    if problem:
        return ConfigError(f"{path}: {problem}: {_DATA_FIX}")
    what = {"json": "JSON or JSON Lines", "csv": "CSV", "parquet": "Parquet", "text": "text"}[builder]
    return ConfigError(f"{path}: not a valid {what} file ({type(err).__name__}: {str(err).strip()[:200]}): {_DATA_FIX}")


def _file_records(path: str, work_dir: str):
    """(index, record) pairs of one local file, read lazily by the `datasets` packaged builder for its suffix
    (streaming: no Arrow copy of the data is written; the builder's lock files go to work_dir)."""
    from datasets import load_dataset

    builder, kw = LOCAL_FORMATS[Path(path).suffix.lower()]
    try:
        with _quiet_datasets():
            ds = load_dataset(builder, data_files=[path], split="train", streaming=True, cache_dir=work_dir, **kw)
            checked = builder != "json"
            for i, item in enumerate(ds):
                if not checked and all(v is None for v in item.values()):
                    checked = True  # the json builder reads a `null` line as a record of Nones: find the line
                    problem = _json_problem(path)
                    if problem:
                        raise ConfigError(f"{path}: {problem}: {_DATA_FIX}")
                yield i, item
    except ConfigError:
        raise
    except Exception as e:  # ArrowInvalid, pandas ParserError, UnicodeDecodeError, OSError ... one clear error
        raise _data_error(path, builder, e) from e


def _saved_records(path: str, report: DataReport):
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(path)  # memory-mapped Arrow: nothing is copied
    if isinstance(ds, DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        report.reader += f", split {split!r}"
        ds = ds[split]
    yield from enumerate(ds)


def iter_texts(source: str, seed: int = 0, text_field: str = "auto", tokenizer=None, report: DataReport | None = None,
               max_chars: int = MAX_DOC_BLOCKS * 128 * CHARS_PER_TOKEN, work_dir: str | None = None):
    """Documents (str) from a dataset, read lazily: the caller stops once it has enough.

    - `stdlib`: the Python standard library's .py files, one document each, in a fixed shuffled order (seed).
    - A local file, folder or glob, through the `datasets` packaged builders (LOCAL_FORMATS): .txt (split at
      blank lines into documents of at most max_chars characters, chunked at line ends when it has none), .py
      and .md (whole documents), .json/.jsonl (JSON Lines or a JSON array), .csv and .parquet; a folder
      written by save_to_disk (load_from_disk).
    - Anything else: a Hub dataset, streamed.
    Records become text by record_text's rules (text_field, the tokenizer's chat template). `report`
    (a DataReport) is filled as reading goes. work_dir holds the builders' lock files while reading (a
    temporary folder inside it, removed after); None: the system's temporary folder.
    Raises ConfigError (naming the file and line, or the record index) for an unsupported or empty file, a
    malformed record, a record that is not an object, and a source where no record has the wanted field.
    """
    import tempfile

    report = report if report is not None else DataReport(source, text_field)
    if not is_local_dataset(source):
        report.reader = "Hub dataset, streamed"
        yield from _iter_hub_texts(source, report, text_field, tokenizer)
        return
    files, report.ignored = local_data_files(source)
    if source == STDLIB_CORPUS:
        random.Random(seed).shuffle(files)  # a fixed, varied order: not 500 blocks of one package
    report.files = len(files)
    if len(files) == 1 and os.path.isdir(files[0]):
        report.reader = "a save_to_disk folder, via datasets.load_from_disk"
    else:
        builders = sorted({LOCAL_FORMATS[Path(f).suffix.lower()][0] for f in files})
        report.reader = f"{len(files)} local file{'s' * (len(files) != 1)} via datasets {', '.join(builders)}"
    if work_dir:
        os.makedirs(work_dir, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="spoonfeed-datasets-", dir=work_dir)
    try:
        for path in files:
            report.files_read += 1
            if os.path.isdir(path):
                records = _saved_records(path, report)
                fmt = None
            else:
                records = _file_records(path, tmp.name)
                fmt = LOCAL_FORMATS[Path(path).suffix.lower()]
            if fmt and fmt[0] == "text":  # a text file's documents are its text, whatever TEXT_FIELD says
                kind = "paragraph" if fmt[1]["sample_by"] == "paragraph" else "document"
                if kind == "paragraph":
                    records = _paragraph_documents(records, max_chars)
                where = (lambda i, p=path: f"{p} paragraph index {i}") if kind == "paragraph" else (lambda i, p=path: p)
                yield from _texts_from_records(records, where, report, "text", tokenizer)
            else:
                yield from _texts_from_records(records, lambda i, p=path: f"{p} record index {i}", report,
                                               text_field, tokenizer)
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
                                   tokenizer)
    report.exhausted = True
    if report.records and report.has_field == 0:
        _no_field_error(report)


_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "<eos>", "<|eot_id|>", "[SEP]")  # to suggest


def check_eos(tokenizer, who: str = "the tokenizer") -> int:
    """The EOS id that joins documents in the blocks (pack_blocks). Raises ConfigError, naming `who` and how to
    give it one, when the tokenizer has no EOS token, or names one its vocabulary lacks (an id of None, or the
    unknown token's id), before any data is read or the teacher loads."""
    eos, name = tokenizer.eos_token_id, tokenizer.eos_token
    missing = eos is None or (eos == tokenizer.unk_token_id and name != tokenizer.unk_token)
    if not missing:
        return eos
    vocab = tokenizer.get_vocab()
    found = [t for t in _EOS_NAMES if t in vocab]
    suggest = f"{found[0]!r}, which it has" if found else "a token of its vocabulary such as '</s>'"
    problem = "has no EOS token" if name is None else f"names the EOS token {name!r}, which is not in its vocabulary"
    raise ConfigError(f"{who} {problem}, and Phase 1 joins documents with EOS: give it one, {suggest}: in the "
                      f"teacher's folder, set \"eos_token\" in tokenizer_config.json; or set tokenizer.eos_token and "
                      "pass tokenizer= to cache_teacher_states")


def pack_blocks(texts, tokenizer, seq_len: int, num_train: int, num_val: int, val_every: int = 10,
                max_doc_blocks: int = MAX_DOC_BLOCKS, report: DataReport | None = None):
    """Tokenize documents, join them with EOS and cut full blocks of seq_len tokens: no padding anywhere.

    Every val_every-th document goes to the held-out stream (until it is full), so train and held-out
    blocks never share a document. A document contributes at most max_doc_blocks blocks, for variety.
    Returns (train (N, T) int32, val (M, T) int32, indices of the held-out documents). `report` (a
    DataReport) gets the token and block counts. Raises ConfigError when either split gets no block, and when
    the tokenizer has no usable EOS (check_eos), before reading any text.
    """
    eos = check_eos(tokenizer)
    want = {"train": num_train * seq_len, "val": num_val * seq_len}
    streams = {"train": [], "val": []}
    cap = max_doc_blocks * seq_len
    val_docs = []
    tokens = n_docs = 0
    for i, text in enumerate(texts):
        n_docs = i + 1
        split = "val" if (i % val_every == val_every - 1 and len(streams["val"]) < want["val"]) or \
            len(streams["train"]) >= want["train"] else "train"
        ids = tokenizer(text[: cap * 12], add_special_tokens=False).input_ids[:cap]  # ~4 chars a token
        streams[split].extend(ids + [eos])
        tokens += len(ids)
        if split == "val":
            val_docs.append(i)
        if all(len(v) >= want[k] for k, v in streams.items()):
            break
    blocks = {}
    for split, ids in streams.items():
        n = min(len(ids) // seq_len, want[split] // seq_len)
        blocks[split] = np.asarray(ids[: n * seq_len], dtype=np.int32).reshape(n, seq_len)
    if report is not None:
        report.tokens, report.seq_len = tokens, seq_len
        report.train_blocks, report.val_blocks = len(blocks["train"]), len(blocks["val"])
    if len(blocks["train"]) == 0 or len(blocks["val"]) == 0:
        skipped = ""
        if report is not None and report.skipped:
            skipped = " Skipped records: " + "; ".join(f"{n} x {why} (first: {where})"
                                                        for why, (n, where) in report.skipped.items()) + "."
        raise ConfigError(f"the dataset gave {len(blocks['train'])} training and {len(blocks['val'])} held-out "
                          f"blocks of {seq_len} tokens from {n_docs} document(s) ({tokens} tokens).{skipped} Each "
                          f"document adds at most {max_doc_blocks} blocks, and held-out blocks come only from "
                          f"documents of their own (every {val_every}th), so the data needs more or longer "
                          "documents: add files (a .py or .md file is one document; a .txt file is split at blank "
                          "lines), or lower MAX_SEQ_LENGTH / NUM_CACHE_SAMPLES")
    for split, n in (("train", num_train), ("val", num_val)):
        if len(blocks[split]) < n:
            print(f"note: the dataset ran out after {len(blocks[split])} of {n} {split} blocks")
    return blocks["train"], blocks["val"], val_docs


def describe_data(cache_or_report, tokenizer=None) -> str:
    """What Phase 1's data gave, as the notebook prints it: the source and how it was read, records read and
    skipped (with the reason and where the first one was), tokens, blocks, and the first training block
    decoded. Takes a TeacherCache (its manifest keeps the report) or a DataReport."""
    if isinstance(cache_or_report, DataReport):
        d, first = asdict(cache_or_report), None
    else:
        d, first = cache_or_report.manifest.get("data"), cache_or_report.train_tokens[0]
        if d is None:
            return "data: this cache was built before data reports were kept (rebuild it to get one)"
    lines = [f"data: {d['source']} ({d['reader']})"]
    if d["ignored"]:
        lines.append(f"  ignored {len(d['ignored'])} file(s) with no supported suffix: "
                     + ", ".join(os.path.basename(f) for f in d["ignored"][:5]) + (" ..." if len(d["ignored"]) > 5 else ""))
    read = f"{d['files_read']} of {d['files']} files, " if d["files"] else ""
    stop = "all of it" if d["exhausted"] else "stopped once the blocks were full"
    skipped = sum(n for n, _ in d["skipped"].values())
    lines.append(f"  read {read}{d['records']:,} records ({stop}): {d['documents']:,} documents, {skipped:,} skipped"
                 + (f"; TEXT_FIELD = {d['text_field']!r}" if d["text_field"] != "auto" else ""))
    for why, (n, where) in sorted(d["skipped"].items(), key=lambda kv: -kv[1][0]):
        lines.append(f"    skipped {n:,} x {why} (first: {where})")
    if d["chat_rendered"]:
        lines.append(f"  chat lists rendered with {d['chat_rendered']}")
    lines.append(f"  {d['tokens']:,} tokens -> {d['train_blocks']} training + {d['val_blocks']} held-out blocks of "
                 f"{d['seq_len']} tokens (documents joined by EOS; held-out documents disjoint from training)")
    if first is not None and tokenizer is not None:
        text = tokenizer.decode(first.tolist())
        lines.append("  first training block, decoded:")
        lines += ["    | " + line for line in text.splitlines()[:12]]
    return "\n".join(lines)
