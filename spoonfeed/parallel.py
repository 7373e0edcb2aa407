"""Data parallelism under `accelerate launch`: this process's share of the work, and the collectives that keep every process in step."""

from __future__ import annotations

import contextlib

import torch


class World:
    """The processes of one run, as accelerate's PartialState sees them; outside a launcher (the notebook, the tests,
    `python -m spoonfeed_run`) one process, where every method gives back its input and runs no collective.

    What every method keeps true: each process calls the same collectives in the same order, so none waits on
    another that has gone elsewhere. Main (index 0) is the process that writes the shared files.
    """

    def __init__(self, state=None):
        self.state = state
        self.num_processes = state.num_processes if state is not None else 1
        self.process_index = state.process_index if state is not None else 0

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    @property
    def parallel(self) -> bool:
        return self.num_processes > 1

    # -- shares of the work -----------------------------------------------------------------------------------------

    def share(self, items):
        """This process's contiguous share of items (a range, list, tuple or tensor), from accelerate's
        split_between_processes: the first len % N processes get one item more. All of it in one process."""
        if not self.parallel:
            return items
        with self.state.split_between_processes(list(items) if isinstance(items, range) else items) as mine:
            return mine

    def positions(self, pos: torch.Tensor, numel: int) -> tuple[torch.Tensor, float]:
        """The loss positions drawn for the whole batch -> this process's, and the factor its mean over them takes.

        pos: (K,) flat positions into the N * numel positions of the batch, process-major (process r holds
        r * numel .. (r + 1) * numel - 1, its rows of the batch). Returns this process's positions (n_r,), less its
        offset, and N * n_r / K: with it, the mean over the processes of (factor * the mean over its own positions)
        is the mean over all K positions, which one process computes with the whole batch. (pos, 1.0) in one process.
        """
        if not self.parallel:
            return pos, 1.0
        lo = self.process_index * numel
        mine = pos[(pos >= lo) & (pos < lo + numel)] - lo
        return mine, self.num_processes * len(mine) / max(1, len(pos))

    # -- collectives ------------------------------------------------------------------------------------------------

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of t over the processes (accelerate's reduce); t itself in one process."""
        if not self.parallel:
            return t
        from accelerate.utils import reduce

        return reduce(t, "mean")

    def sum(self, value: float) -> float:
        """A number summed over the processes (counts, flags)."""
        if not self.parallel:
            return value
        from accelerate.utils import reduce

        return reduce(torch.tensor([float(value)], dtype=torch.float64, device=self.state.device), "sum").item()

    def gather(self, items: list) -> list:
        """Every process's list, joined in process order (accelerate's gather_object): each process gets all of it."""
        if not self.parallel:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def on_main(self, fn):
        """fn() run on the main process alone, and its (picklable) result handed to every process."""
        if not self.parallel:
            return fn()
        from accelerate.utils import broadcast_object_list

        with self.together():
            result = [fn() if self.is_main_process else None]
        return broadcast_object_list(result)[0]

    def main_first(self, fn):
        """fn(main=True) on the main process, then fn(main=False) on the others, once it has returned: the main
        process creates or moves the shared files, the others then open what it left. fn(True) in one process."""
        if not self.parallel:
            return fn(True)
        with self.together():
            result = fn(True) if self.is_main_process else None
        with self.together():
            if not self.is_main_process:
                result = fn(False)
        return result

    def wait(self) -> None:
        """accelerate's wait_for_everyone."""
        if self.parallel:
            self.state.wait_for_everyone()

    @contextlib.contextmanager
    def together(self):
        """An exception raised inside the block on any process is raised on every process, once all of them have
        reached the block's end: the same decision everywhere, so that no process goes on alone into a collective
        that the others never reach. The process that failed raises its own exception; the others raise one of the
        same class (RuntimeError when it cannot be rebuilt from a message), naming that process. The block itself
        must run no collective."""
        if not self.parallel:
            yield
            return
        error = None
        try:
            yield
        except Exception as e:  # every kind: it is handed on, below
            error = e
        failed = [f for f in self.gather([None if error is None else (self.process_index, type(error), str(error))])
                  if f is not None]
        if error is not None:
            raise error
        if failed:
            index, kind, message = failed[0]
            try:
                other = kind(f"process {index} of {self.num_processes} stopped the run: {message}")
            except Exception:  # a class whose constructor takes other arguments
                other = RuntimeError(f"process {index} of {self.num_processes} stopped the run: "
                                     f"{kind.__name__}: {message}")
            raise other

    def average_gradients(self, params) -> None:
        """After backward: every parameter's gradient becomes its mean over the processes (accelerate's reduce), in
        buckets of GRAD_BUCKET elements, so that one optimiser step on N processes with batch B each is one step on
        the mean gradient of the N * B rows. A parameter with no gradient here counts as zeros; one with no gradient on
        any process keeps none (AdamW then leaves it alone, as one process does). A sparse gradient (a lazy
        embedding's, EMBEDDING_UPDATE) stays sparse: the rows of every process are gathered (gather_object) and
        summed, divided by N, so it holds the rows the whole batch touched. Nothing in one process."""
        if not self.parallel:
            return
        from accelerate.utils import reduce

        params = [p for p in params if p.requires_grad]
        if not params:
            return
        flags = reduce(torch.tensor([[p.grad is not None, p.grad is not None and p.grad.is_sparse] for p in params],
                                    dtype=torch.float32, device=params[0].device), "sum")  # (P, 2): any, sparse
        had, sparse = (flags[:, 0] > 0).tolist(), (flags[:, 1] > 0).tolist()
        dense = [p for p, s in zip(params, sparse) if not s]
        for p in dense:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _buckets(dense):
            flat = reduce(torch.cat([p.grad.reshape(-1) for p in bucket]), "mean")
            i = 0
            for p in bucket:
                p.grad.copy_(flat[i:i + p.numel()].view_as(p))
                i += p.numel()
        for p in (p for p, s in zip(params, sparse) if s):
            g = p.grad.coalesce() if p.grad is not None else torch.sparse_coo_tensor(
                torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, *p.shape[1:]), p.shape, check_invariants=True
            ).coalesce()
            parts = self.gather([(g.indices().cpu(), g.values().cpu())])  # on the CPU: each process unpickles them
            rows = torch.cat([i for i, _ in parts], dim=1)
            values = torch.cat([v for _, v in parts]).to(p.dtype) / self.num_processes
            p.grad = torch.sparse_coo_tensor(rows, values, p.shape, check_invariants=True).coalesce().to(p.device)
        for p, any_grad in zip(params, had):
            if not any_grad:
                p.grad = None


GRAD_BUCKET = 2**24  # gradient elements all-reduced at once (64 MiB in float32): one collective per bucket


def _buckets(params):
    """params in consecutive groups of one dtype and device, each of at most GRAD_BUCKET elements (or one tensor)."""
    bucket, size = [], 0
    for p in params:
        if bucket and (size + p.numel() > GRAD_BUCKET or (p.grad.dtype, p.grad.device) !=
                       (bucket[0].grad.dtype, bucket[0].grad.device)):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        yield bucket


ONE = World()  # one process: the notebook, the tests, `python -m spoonfeed_run`


_world = None


def world() -> World:
    """The processes of this run: accelerate's PartialState once a launcher has started torch.distributed (and
    `spoonfeed_run` has made the PartialState), else ONE. Raises RuntimeError when torch.distributed runs several
    processes that PartialState does not count (a PartialState made for the wrong device: see spoonfeed_run)."""
    global _world
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        _world = None
        return ONE
    if _world is None:
        from accelerate import PartialState

        state = PartialState()
        if state.num_processes != dist.get_world_size():
            raise RuntimeError(f"torch.distributed runs {dist.get_world_size()} processes but accelerate counts "
                               f"{state.num_processes} ({state.distributed_type}): make the PartialState with "
                               "cpu=True for CPU processes before any work (spoonfeed_run does)")
        _world = World(state)
    return _world
