"""papermill's own command line, made to show a headless run as it happens.

    python scripts/run_notebook.py spoon_feed.ipynb out.ipynb -p PRESET smoke -p SEED 1   # any papermill option

It is papermill's click command unchanged, except that its call to papermill.execute_notebook gets a few
more keyword arguments, which papermill hands on to nbclient's NotebookClient, and the kernel three environment
variables. What they add:
- each cell's `# @title` line as the cell starts, with the seconds since the start (nbclient's `on_cell_start`);
- the kernel's stdout and stderr copied to the terminal as they arrive (papermill's `stdout_file`/`stderr_file`);
- the phase bars as text bars on stderr (SPOONFEED_PROGRESS=text, see `spoonfeed.plots.progress_bar`): a
  headless kernel has no front end to draw a widget, so a widget bar would never reach the terminal;
- each cell's stream output merged into one in the saved notebook (nbclient's `coalesce_streams`);
- a failing cell named by its title, with its traceback, and exit status 1 (papermill's own message is a
  long traceback through its command-line code);
- the names given with -p, in SPOONFEED_SET, so that a setting typed at its form default wins over the preset
  (spoonfeed.config.make_config's `explicit`): `-p PRESET cpu -p LOGIT_KD_STEPS 150` trains 150 steps, not the
  preset's 110.
"""
import os
import re
import sys
import time

import papermill.cli
from papermill.exceptions import PapermillExecutionError
from papermill.execute import execute_notebook as papermill_execute_notebook

START = time.monotonic()
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def title(source: str) -> str:
    """The cell's `# @title` text, else its first line."""
    first = source.strip().splitlines()[0] if source.strip() else ""
    return first.removeprefix("# @title").strip()


def show_cell(cell, cell_index, **_):
    if cell.cell_type != "code":
        return
    if "injected-parameters" in cell.metadata.get("tags", []):
        lines = [s for s in cell.source.splitlines() if s and not s.startswith("#")]
        text = "parameters from the command line: " + ", ".join(lines)
    else:
        text = title(cell.source)
    print(f"\n[{time.monotonic() - START:6.0f} s] {text}", flush=True)


class UnknownParameter(Exception):
    pass


def check_parameters(input_path, parameters) -> None:
    """A -p name that the notebook's parameters cell does not set is refused before anything runs: papermill
    itself only warns, and the run would go on with the default (a typo such as STUDENT_DIMS)."""
    import difflib

    from papermill import inspect_notebook

    known = set(inspect_notebook(input_path))
    for name in parameters or {}:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            raise UnknownParameter(f"unknown parameter {name!r}" + (f": did you mean {near[0]!r}?" if near else ".")
                                   + f" The notebook's settings are: {', '.join(sorted(known))}")


def execute_notebook(input_path, output_path, *args, stdout_file=None, stderr_file=None, **kwargs):
    check_parameters(input_path, kwargs.get("parameters"))
    # the kernel inherits it: cell 2 lets these settings win over the preset even at their form default
    os.environ["SPOONFEED_SET"] = ",".join(kwargs.get("parameters") or {})
    execute_notebook.output_path = output_path
    return papermill_execute_notebook(
        input_path, output_path, *args, stdout_file=stdout_file or sys.stdout, stderr_file=stderr_file or sys.stderr,
        on_cell_start=show_cell, coalesce_streams=True, **kwargs)


if __name__ == "__main__":
    os.environ.setdefault("SPOONFEED_PROGRESS", "text")  # the kernel inherits the environment
    os.environ.setdefault("TQDM_MININTERVAL", "1")  # tqdm's own setting: a bar line a second is enough
    papermill.cli.execute_notebook = execute_notebook
    try:
        papermill.cli.papermill(prog_name="run_notebook.py")
    except UnknownParameter as e:
        print(f"\nrefused before any cell ran: {e}", file=sys.stderr)
        sys.exit(2)
    except PapermillExecutionError as e:
        tb = "\n".join(e.traceback)
        print(f"\nFAILED in cell \"{title(e.source)}\" (In [{e.exec_count}]): {e.ename}: {e.evalue}\n"
              f"{tb if sys.stderr.isatty() else ANSI.sub('', tb)}\n"
              f"The executed notebook, with the error, is {getattr(execute_notebook, 'output_path', '?')}",
              file=sys.stderr)
        sys.exit(1)
