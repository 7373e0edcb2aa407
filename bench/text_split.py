"""One big .txt file with no blank lines (issue 27, item 4): reading it into documents must take time linear in
its size, and the first document must not wait for the whole file. One process, one machine, side by side:

    nice -n 10 python bench/text_split.py            # 6 MiB and 24 MiB files, three runs each: about a minute
    python bench/text_split.py --smoke               # 64 KiB and 256 KiB (run by the tests)
    python bench/text_split.py --before              # also the reader before the fix, for comparison (slow)

The figure is a ratio: seconds to read the 4x file / seconds to read the 1x file, each the best of --repeat runs
of sf.iter_texts over the whole file (datasets' text builder a line at a time, then data._text_documents) at the
`cpu` preset's document size (4 blocks x 128 tokens x 3 characters). Linear reading gives about 4; the target is
at most 5. Also timed: seconds to the first document (streaming: it should not grow with the file). --before
runs the reader the fix replaced (datasets' text builder by paragraph, then the old cutter, which copies what is
left of the text at each cut) at the same sizes. Results: bench/results/text_split-cpu-<date>.json and
.md, with the load average (on a loaded machine the ratio holds but the seconds are not speed figures).
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import spoonfeed_helpers as sf  # noqa: E402
from bench.run import machine_name  # noqa: E402
from spoonfeed.data import CHARS_PER_TOKEN, MAX_DOC_BLOCKS  # noqa: E402

MAX_CHARS = MAX_DOC_BLOCKS * 128 * CHARS_PER_TOKEN  # the cpu preset's documents: 1,536 characters


def write_file(path: Path, mib: float, seed: int = 0) -> Path:
    """A text file of about `mib` MiB: lines of 6 to 18 words, no blank line anywhere."""
    rng = random.Random(seed)
    words = "the cat dog sat ran on a mat log big small red blue and then it was happy sad over under".split()
    lines, size = [], 0
    while size < mib * 2**20:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(6, 18)))
        lines.append(line)
        size += len(line) + 1
    path.write_text("\n".join(lines) + "\n")
    return path


def time_after(path: Path, work: str):
    """(seconds to the first document, seconds to read every document, documents) with the reader as it is."""
    t0 = time.perf_counter()
    docs = sf.iter_texts(str(path), max_chars=MAX_CHARS, work_dir=work)
    next(docs)
    first = time.perf_counter() - t0
    n = 1 + sum(1 for _ in docs)
    return first, time.perf_counter() - t0, n


def _old_split(text: str, max_chars: int) -> list:
    """The cutter before the fix: each cut copies the rest of the text (text = text[cut:]), quadratic overall."""
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


def time_before(path: Path, work: str):
    """The same figures with the reader before the fix: datasets' text builder by paragraph (which holds a file
    with no blank line until its end), then the old cutter."""
    from datasets import load_dataset

    t0 = time.perf_counter()
    first, n = None, 0
    ds = load_dataset("text", data_files=[str(path)], split="train", streaming=True, cache_dir=work,
                      sample_by="paragraph")
    for row in ds:
        for _ in _old_split(row["text"].strip(), MAX_CHARS):
            first = first if first is not None else time.perf_counter() - t0
            n += 1
    return first, time.perf_counter() - t0, n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny files: checks that the script runs")
    ap.add_argument("--mib", type=float, default=6.0, help="size of the 1x file, MiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--before", action="store_true", help="also time the reader before the fix")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/text_split-<date>.json)")
    args = ap.parse_args(argv)
    mib = 1 / 16 if args.smoke else args.mib
    repeat = 1 if args.smoke else args.repeat
    machine = machine_name()
    load = os.getloadavg()[0]  # other work on the machine: the ratio holds, the seconds are not speed figures
    print(f"Machine: {machine}; load average {load:.1f} at the start\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {k: write_file(Path(tmp) / f"big-{k}x.txt", mib * k) for k in (1, 4)}
        time_after(write_file(Path(tmp) / "warm-up.txt", 1 / 64), tmp)  # imports and datasets' first-call set-up
        readers = [("after (this code)", time_after)] + ([("before the fix", time_before)] if args.before else [])
        for name, fn in readers:
            best = {}
            for k, path in files.items():
                runs = [fn(path, tmp) for _ in range(repeat)]
                best[k] = min(runs, key=lambda r: r[1])
            rows.append({"reader": name, "mib": mib, "documents": [best[1][2], best[4][2]],
                         "first_s": [best[1][0], best[4][0]], "total_s": [best[1][1], best[4][1]],
                         "ratio_4x": best[4][1] / best[1][1], "first_ratio_4x": best[4][0] / best[1][0]})
    lines = ["| reader | 1x file | 4x file | read 1x, s | read 4x, s | 4x / 1x (target <= 5) "
             "| first document 1x / 4x, s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['reader']} | {r['mib']:g} MiB, {r['documents'][0]:,} documents | {4 * r['mib']:g} MiB, "
                     f"{r['documents'][1]:,} documents | {r['total_s'][0]:.2f} | {r['total_s'][1]:.2f} | "
                     f"**{r['ratio_4x']:.2f}** | {r['first_s'][0]:.3f} / {r['first_s'][1]:.3f} |")
    table = "\n".join(lines)
    print(table)
    load = f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    result = {"machine": machine, "load": load, "repeat": repeat, "max_chars": MAX_CHARS, "rows": rows}
    if not args.smoke:
        out = Path(args.out or ROOT / "bench" / "results" / f"text_split-cpu-{time.strftime('%Y-%m-%d')}.json")
        out.write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(f"Machine: {machine}; {load}\n\n`python bench/text_split.py"
                                          f"{' --before' if args.before else ''}`\n\n{table}\n")
        print(f"\nwrote {out} and {out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
