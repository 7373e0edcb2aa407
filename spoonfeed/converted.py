"""The bundled GGUF teacher's converted copy: an ordinary transformers folder in the user cache, made once, reused.

transformers parses the bundled GGUF file on every load (its 49152-token arrays, its tensor-name map, the
tokenizer's conversion): seconds for the tokenizer, more for the model. The first load does that as before, then
writes what it loaded as a transformers folder (`save_pretrained`), checks that the folder loads back the same
(the tokenizer's vocabulary, special tokens, chat template and tokenization of probe texts; the model's every
tensor, bit for bit) and renames it into place. Later loads read the folder with `from_pretrained`. The tokenizer's
folder also keeps the GGUF's tokenizer.* keys (JSON), which export_gguf copies into the student's GGUF.

Where: SPOONFEED_TEACHER_CACHE, else $XDG_CACHE_HOME/spoonfeed/teacher, else ~/.cache/spoonfeed/teacher, shared by
every run and CACHE_DIR as the Hub's download cache is; SPOONFEED_TEACHER_CACHE=0 turns it off. Each copy sits in
a folder named by its key (the GGUF file's path, size and mtime; the versions of the package that ships it, of
transformers, tokenizers and gguf; the model's dtype), so a copy is never stale: another key is another folder,
converted on its first use. Deleting the folder is always safe: the next load converts again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from .cache import begin_build
from .config import ENV_OFF
from .files import _remove, space_problem

CACHE_ENV = "SPOONFEED_TEACHER_CACHE"  # a folder, or 0 / off / false / no: no converted copies


CONVERTED_FORMAT = "spoonfeed-converted-teacher-v3"  # v2: GGUF tokenizer.* keys kept; v3: file times in the manifest


MANIFEST = "spoonfeed-converted.json"  # written last into each copy: its key and every file's size


TOKENIZER_PROBES = (  # texts whose ids the converted tokenizer must give as the GGUF's does
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return {'a': [x ** 2, 0x1F]}  # comment\n\tif x != 3: pass\r\n",
    "naïve café, Ünïcödé — 日本語のテキスト, emoji 🙂👍🏽, Ελληνικά, русский, العربية",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<|endoftext|>",
    "   leading and trailing spaces   ", "", "\n\n\n", "a" * 300,
)


def cache_root() -> Path | None:
    """The folder that holds the converted copies: $SPOONFEED_TEACHER_CACHE, else $XDG_CACHE_HOME/spoonfeed/teacher,
    else ~/.cache/spoonfeed/teacher. None when SPOONFEED_TEACHER_CACHE is 0, off, false or no (every load then
    parses the GGUF file, as before the copies existed)."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in ENV_OFF:
        return None
    if value:
        return Path(os.path.expanduser(value)).absolute()  # one folder, whichever folder a run starts in
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(xdg):  # unset, or relative: the XDG spec says to ignore a relative one
        xdg = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "spoonfeed" / "teacher"


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def copy_key(gguf_path, part: str) -> dict:
    """What a converted copy is keyed by. part: "tokenizer", or the model's dtype ("bfloat16", "float32"). The GGUF
    file is known by its real path, size in bytes and mtime in ns (reinstalling the package changes the mtime), and
    by the version of the package that ships it; the conversion by the versions of transformers, tokenizers and
    gguf, which read the file. Raises OSError when the file cannot be read (stat)."""
    from .config import BUNDLED_PACKAGE

    real = os.path.realpath(gguf_path)
    stat = os.stat(real)
    return {"format": CONVERTED_FORMAT, "part": part, "file": real, "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            **{dist: _version(dist) for dist in (BUNDLED_PACKAGE.replace("_", "-"), "transformers", "tokenizers",
                                                 "gguf")}}


def copy_folder(root: Path, key: dict) -> Path:
    """root / 'smollm2-<part>-<16 hex digits of the key>': one folder per key, never rewritten in place."""
    from .config import BUNDLED_TEACHER

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root) / f"{BUNDLED_TEACHER}-{key['part']}-{digest}"


def intact(folder: Path, key: dict) -> bool:
    """Whether folder holds a finished copy for key: its manifest (written last) names this key, and every file
    it lists is there with the size and the modification time (ns) it lists. A half-written, truncated, edited
    (even to the same size) or foreign folder is not intact. Sizes and times, not digests: checking costs no
    pass over the 257 to 514 MiB of weights at every load; a copy written over with its old times restored on
    purpose is not detected."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return manifest["key"] == key and all(
            [(st := (folder / name).stat()).st_size, st.st_mtime_ns] == listed
            for name, listed in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _write_manifest(build: Path, key: dict) -> None:
    files = {p.name: [(st := p.stat()).st_size, st.st_mtime_ns] for p in sorted(build.iterdir()) if p.is_file()}
    (build / MANIFEST).write_text(json.dumps({"key": key, "files": files}, indent=1, sort_keys=True))


def _set_aside(folder: Path) -> None:
    """Remove folder (a copy that is not intact or did not load): renamed first to a name begin_build clears."""
    aside = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:12]}")
    try:
        os.replace(folder, aside)
    except FileNotFoundError:
        return
    _remove(aside)


def _publish(build: Path, folder: Path, key: dict) -> bool:
    """Rename the finished build to folder; the first process to finish wins. A rename onto a folder that is not
    empty fails: when that folder is an intact copy of the same key (another process converted at the same time)
    this build is dropped, else what is there is set aside and the rename tried again. Returns whether this
    build is the one in place (False: another process's was)."""
    for _ in range(5):
        try:
            os.rename(build, folder)
            return True
        except OSError:
            if intact(folder, key):
                shutil.rmtree(build, ignore_errors=True)
                return False
            _set_aside(folder)
    raise OSError(f"could not put the converted copy in place as {folder}: other processes kept replacing it")


def load_via_copy(part: str, gguf_path, load, save, same, need=None):
    """What load(path, kw) returns, read from the converted copy of `part` where there is one for its key (kw is
    {}), else from the GGUF (kw {"gguf_file": name}); after a GGUF load, the copy is made: save(obj, folder) writes
    it, same(obj, folder) checks that folder loads back what was loaded, then it is published and later loads read
    it. need(obj): the bytes the copy will take on disk, checked for before writing (None: no check).

    Whatever goes wrong with the copy (an unwritable or full location, a copy that does not load or load back the
    same) costs no more than the GGUF load: one line says why, the object loaded from the GGUF is returned, and the
    build is removed. Errors of the GGUF load itself are raised as load raises them. Returns the loaded object."""
    gguf_dir, gguf_file = os.path.split(os.fspath(gguf_path))
    what = part if part == "tokenizer" else f"model ({part})"
    root = cache_root()
    if root is None:
        return load(gguf_dir, {"gguf_file": gguf_file})
    key = copy_key(gguf_path, part)
    folder = copy_folder(root, key)
    unreadable = False
    if intact(folder, key):
        try:
            return load(str(folder), {})
        except Exception as e:  # any fault of the copy: the GGUF is still there to load from
            unreadable = True
            print(f"the bundled teacher's converted {what} in {folder} did not load ({type(e).__name__}: "
                  f"{_first_line(e)}): converting it again")
    obj = load(gguf_dir, {"gguf_file": gguf_file})
    if not unreadable and intact(folder, key):
        return obj  # another process converted it while this one loaded the GGUF
    build = None
    try:
        if os.path.lexists(folder):
            _set_aside(folder)  # half-written, foreign, or it did not load above
        build = begin_build(folder)
        problem = need and space_problem(build, need(obj), f"the converted {what} needs", "", "MiB")
        if problem:
            raise OSError(problem.rstrip(": "))
        save(obj, build)
        if not same(obj, build):
            raise ValueError("it does not load back what the GGUF file gave")
        _write_manifest(build, key)
        if _publish(build, folder, key):
            print(f"the bundled teacher's {what}: converted once from its GGUF into {folder}; later loads read it "
                  f"({CACHE_ENV}=0 turns this off)")
    except Exception as e:  # the copy only saves time: a failure to make it must not fail the load
        if build is not None:
            shutil.rmtree(build, ignore_errors=True)
        print(f"the bundled teacher's {what} was loaded from its GGUF file and could not be kept converted in "
              f"{root} ({type(e).__name__}: {_first_line(e)}); set {CACHE_ENV} to a writable folder, or to 0 to "
              "stop trying")
    return obj


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0][:200]


def save_tokenizer(tokenizer, folder: Path) -> None:
    """tokenizer.save_pretrained(folder): tokenizer.json, tokenizer_config.json and the chat template; and, for a
    tokenizer read from a GGUF file, that file's tokenizer.* keys (export.save_tokenizer_fields), which export_gguf
    copies into the student's GGUF. Raises OSError when the folder cannot be written, ValueError when the keys do
    not read back as they were."""
    from .export import _gguf_tokenizer_source, gguf_tokenizer_fields, load_tokenizer_fields, save_tokenizer_fields

    tokenizer.save_pretrained(folder)
    source = _gguf_tokenizer_source(tokenizer)
    if source is not None:
        fields = gguf_tokenizer_fields(source)
        save_tokenizer_fields(fields, folder)
        if load_tokenizer_fields(folder) != fields:
            raise ValueError(f"the GGUF tokenizer keys saved in {folder} do not read back as {source} holds them")


def same_tokenizer(tokenizer, folder: Path) -> bool:
    """Whether the tokenizer saved in folder is `tokenizer`: class, vocabulary, added and special tokens (ids
    included), chat template, padding side, and the ids of TOKENIZER_PROBES (ASCII, code, unicode, special)."""
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(folder)
    return (type(other) is type(tokenizer) and other.get_vocab() == tokenizer.get_vocab()
            and str(other.added_tokens_decoder) == str(tokenizer.added_tokens_decoder)
            and other.special_tokens_map == tokenizer.special_tokens_map
            and other.all_special_ids == tokenizer.all_special_ids
            and (other.bos_token_id, other.eos_token_id, other.pad_token_id) ==
                (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
            and other.chat_template == tokenizer.chat_template and other.padding_side == tokenizer.padding_side
            and all(other(t)["input_ids"] == tokenizer(t)["input_ids"] for t in TOKENIZER_PROBES))


def save_model(model, folder: Path) -> None:
    """save_pretrained of a model loaded from the GGUF file. transformers' legacy GGUF loader leaves plain layers
    (dequantized into the dtype asked for) but keeps its GGUF quantizer, which refuses to serialize; the
    quantizer's own remove_quantization_config drops it and the quantization_config, as its dequantize() does
    for the methods that have one. same_model then checks that nothing packed was written."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(folder)


def same_model(model, folder: Path) -> bool:
    """Whether the model saved in folder, loaded on the CPU in model's dtype, holds model's tensors: the same names,
    dtypes and values, bit for bit (the model may sit on any device). Raises what from_pretrained raises for a
    folder it cannot read."""
    import torch
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(folder, dtype=model.dtype).state_dict()
    mine = model.state_dict()
    return other.keys() == mine.keys() and all(
        other[k].dtype == v.dtype and torch.equal(other[k], v.detach().cpu()) for k, v in mine.items())
