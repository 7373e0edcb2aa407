"""torch.compile for the training and decode steps: the COMPILE setting, once per shape, eager as the fallback."""

from __future__ import annotations

import time
import warnings

import torch

BACKEND = "inductor"  # torch.compile's default: C++/OpenMP kernels on a CPU, Triton on CUDA (tests use aot_eager)


COMPILE_TIMES: dict = {}  # (name, shapes) -> seconds of the first call, the compile included: reported apart
EAGER_CALLS = [0]  # calls that ran eager because their compile had failed (progress())


def shapes(args) -> tuple:
    """What a compiled step is specialised on: each tensor argument's (shape, dtype, device), a model argument's
    config (its `cfg`: a ternary or full-precision student of another width is another graph), and the grad mode
    and autocast state it runs under."""
    out = [tuple((tuple(a.shape), str(a.dtype), a.device.type) if torch.is_tensor(a) else repr(getattr(a, "cfg", None))
                 for a in args)]
    out.append(torch.is_grad_enabled())
    out.append(torch.is_autocast_enabled("cpu") and str(torch.get_autocast_dtype("cpu")))
    return tuple(out)


class Compiled:
    """fn(*args) through torch.compile(fn, dynamic=False): a graph for each set of input shapes (`shapes`), so a
    step with fixed shapes (Phase 2's fixed batch, a StaticKVCache's fixed slots) compiles once.

    The first call with new shapes is timed on its own and recorded in COMPILE_TIMES with a printed line: that
    is the compile time, kept apart from the step times (for a training step, the backward compiles at its first
    backward, inside the first step: Phase reports that step's time). When torch.compile fails (no C++
    compiler, an unsupported operator) a warning names the error and fn runs eager from then on. Source:
    torch.compile (PyTorch 2), TorchDynamo + TorchInductor.
    """

    instances: list = []  # every Compiled made, for reset()

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name
        self.compiled = None
        self.failed: str | None = None
        Compiled.instances.append(self)

    def __call__(self, *args):
        if self.failed is not None:
            EAGER_CALLS[0] += 1
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=False, backend=BACKEND)
        key = (self.name, shapes(args))
        if key in COMPILE_TIMES:
            return self.compiled(*args)
        start = time.perf_counter()
        try:
            out = self.compiled(*args)
        except Exception as e:  # noqa: BLE001 -- any compiler failure: the eager step is the same computation
            root = e
            while getattr(root, "inner_exception", None) or root.__cause__:  # torch wraps the compiler's error
                root = getattr(root, "inner_exception", None) or root.__cause__
            self.failed = f"{type(root).__name__}: {(str(root).strip().splitlines() or [''])[0]}"[:300]
            warnings.warn(f"torch.compile failed for {self.name} ({self.failed}); it runs eager from now on. "
                          "COMPILE = False skips the attempt")
            EAGER_CALLS[0] += 1
            return self.fn(*args)
        COMPILE_TIMES[key] = seconds = time.perf_counter() - start
        print(f"{self.name}: compiled in {seconds:.1f} s for these shapes (torch.compile, once per shape)")
        return out


def progress() -> tuple[int, int]:
    """Where compiling stands in this process: (how many step shapes have been compiled, how many calls ran eager
    after their compile failed). Two readings, before and after a step, say whether that step compiled a graph,
    ran eager, or reused a graph compiled before (neither count moved)."""
    return len(COMPILE_TIMES), EAGER_CALLS[0]


def reset() -> None:
    """Forget every compiled step (torch._dynamo.reset, COMPILE_TIMES, failures): the next call compiles afresh,
    with BACKEND as it is then. For the tests and the bench's compile-time rows."""
    torch._dynamo.reset()
    COMPILE_TIMES.clear()
    for c in Compiled.instances:
        c.compiled, c.failed = None, None
