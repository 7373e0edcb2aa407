"""Loading the bundled teacher: from its GGUF file (as before the converted copy) against from its converted copy,
side by side in one process, the tokenizer and the model.

    nice -n 5 python bench/teacher_load.py                       # both parts, 3 rounds: about a minute on 2 cores
    python bench/teacher_load.py --parts tokenizer --repeats 1   # the tokenizer only, seconds (run by the tests)

Each round times the GGUF load (SPOONFEED_TEACHER_CACHE=0: transformers parses the file) and then the load of the
converted copy, in the dtype that PRECISION auto picks on this CPU. The copy is made first, into a temporary
folder of its own (the user cache is left alone), and that first load, conversion included, is timed too.
Printed: the median seconds of each and their ratio; --out writes them as JSON.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import spoonfeed_helpers as sf  # noqa: E402
from spoonfeed.converted import CACHE_ENV  # noqa: E402


def _load(part: str, tokenizer):
    if part == "tokenizer":
        return sf.load_tokenizer(sf.BUNDLED_TEACHER)
    return sf.load_teacher(sf.BUNDLED_TEACHER, "cpu", tokenizer)[0]


def _timed(part: str, tokenizer, cache: str) -> float:
    os.environ[CACHE_ENV] = cache
    start = time.perf_counter()
    _load(part, tokenizer)
    return time.perf_counter() - start


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="tokenizer,model", help="comma-separated: tokenizer, model")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (GGUF load, copy load)")
    ap.add_argument("--out", help="write the figures here as JSON")
    args = ap.parse_args(argv)
    before = os.environ.get(CACHE_ENV)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="teacher-copy-") as folder:
            tokenizer = None
            for part in args.parts.split(","):
                if part == "model" and tokenizer is None:  # load_teacher is timed without its tokenizer
                    os.environ[CACHE_ENV] = folder
                    tokenizer = sf.load_tokenizer(sf.BUNDLED_TEACHER)
                first = _timed(part, tokenizer, folder)  # converts into folder
                gguf, copy = [], []
                for _ in range(args.repeats):
                    gguf.append(_timed(part, tokenizer, "0"))
                    copy.append(_timed(part, tokenizer, folder))
                row = {"part": part, "gguf_s": statistics.median(gguf), "copy_s": statistics.median(copy),
                       "first_load_with_conversion_s": first, "repeats": args.repeats}
                row["ratio"] = row["gguf_s"] / row["copy_s"]
                rows.append(row)
                print(f"{part}: GGUF {row['gguf_s']:.2f} s, converted copy {row['copy_s']:.3f} s "
                      f"({row['ratio']:.0f}x); the first load, conversion included, {first:.2f} s", flush=True)
    finally:
        if before is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = before
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                              "load_average": os.getloadavg(), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
