"""Packing documents into token blocks: joined by EOS, no padding, held-out blocks from documents of their own."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .data import _split_text, CHARS_PER_TOKEN, MAX_DOC_BLOCKS
from .errors import ConfigError

if TYPE_CHECKING:
    from .data import DataReport


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
    blocks never share a document. A document contributes at most max_doc_blocks blocks, for variety; but when
    the documents run out before the blocks are full, the rest of each longer document (one long book, one big
    module) is cut into pieces of at most max_doc_blocks blocks (_continuations: disjoint regions of it, cut at
    line ends) and each piece goes to the split that is less full, so a long document gives as many blocks as
    its length allows and held-out text still shares no text with training.
    Returns (train (N, T) int32, val (M, T) int32, indices of the held-out documents and pieces). `report` (a
    DataReport) gets the token, block and piece counts. Raises ConfigError when either split gets no block, and
    when the tokenizer has no usable EOS (check_eos), before reading any text.
    """
    eos = check_eos(tokenizer)
    want = {"train": num_train * seq_len, "val": num_val * seq_len}
    streams = {"train": [], "val": []}
    cap = max_doc_blocks * seq_len
    val_docs, long_docs, kept = [], [], 0  # long_docs: documents cut at the cap, whose rest may be needed
    tokens = n_docs = 0

    def full(split):
        return len(streams[split]) >= want[split]

    def add(i, split, ids):
        nonlocal tokens
        streams[split].extend(ids + [eos])
        tokens += len(ids)
        if split == "val":
            val_docs.append(i)

    for i, text in enumerate(texts):
        n_docs = i + 1
        split = "val" if (i % val_every == val_every - 1 and not full("val")) or full("train") else "train"
        ids = tokenizer(text[: cap * 12], add_special_tokens=False).input_ids  # ~4 chars a token
        if (len(ids) > cap or len(text) > cap * 12) and kept < 12 * sum(want.values()):  # at most what could fit
            long_docs.append(text)
            kept += len(text)
        add(i, split, ids[:cap])
        if full("train") and full("val"):
            break
    else:  # the documents ran out first: continue the long ones, piece by piece, into the split less full
        pieces = 0
        for piece in _continuations(long_docs, tokenizer, cap):
            split = min(("val", "train"), key=lambda k: len(streams[k]) / max(want[k], 1))
            add(n_docs + pieces, split, tokenizer(piece, add_special_tokens=False).input_ids[:cap])
            pieces += 1
            if full("train") and full("val"):
                break
        if report is not None and pieces:
            report.long_documents, report.pieces = len(long_docs), pieces
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
                          f"blocks of {seq_len} tokens from {n_docs} document(s) ({tokens} tokens, all of its "
                          f"text).{skipped} Held-out blocks come from documents (or pieces of long ones) of their "
                          "own, so the data needs more or longer documents: add files, or lower MAX_SEQ_LENGTH / "
                          "NUM_CACHE_SAMPLES")
    for split, n in (("train", num_train), ("val", num_val)):
        if len(blocks[split]) < n:
            print(f"note: the dataset ran out after {len(blocks[split])} of {n} {split} blocks")
    return blocks["train"], blocks["val"], val_docs


def _continuations(long_docs, tokenizer, cap: int):
    """The text of each long document after the cap tokens pack_blocks took from it, cut into consecutive
    pieces of at most cap * CHARS_PER_TOKEN characters at line ends (_split_text). Where the cap ended is read
    from the fast tokenizer's offsets; a slow tokenizer (no offsets) skips to character cap * 12, past anything
    taken, so no piece repeats text already packed."""
    for text in long_docs:
        try:
            enc = tokenizer(text[: cap * 12], add_special_tokens=False, return_offsets_mapping=True)
            start = enc["offset_mapping"][cap - 1][1] if len(enc["input_ids"]) > cap else cap * 12
        except NotImplementedError:  # a Python tokenizer: no offsets
            start = cap * 12
        yield from _split_text(text[start:].strip(), cap * CHARS_PER_TOKEN)
