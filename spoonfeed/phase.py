"""The phase scaffold that every training loop shares (Phases 2 and 3, the ablation's direct-CE arm).

It builds, in one order: AdamW, the LR schedule, the batch generator, the precision policy and its GradScaler,
resume from the last good checkpoint, the fault guard; then checkpoints and teardown. Under `accelerate launch`
it is also where the processes are kept in step (docs/multi-gpu.md): each draws its rows of one batch, the loss
is averaged over them, the gradients in optimizer_step, and the main process alone writes the checkpoints.
"""

from __future__ import annotations

import time

import torch

from .checkpoints import _checkpoint_due, _checkpoint_every, _resume, load_checkpoint
from .compile import progress as compile_progress
from .optim import _adamw, _FaultGuard, _free_training_state, lr_schedule, optimizer_step
from .parallel import world
from .plots import progress_bar
from .precision import make_grad_scaler, precision_policy


class Phase:
    """What a training loop needs around its research step, built in one place and in one order.

    Builds AdamW over `params` (the embedding, when given, at lr * embed_lr_mult; with cfg.embedding_update "lazy"
    its nn.Embedding gives sparse gradients for the phase and LazyAdamW updates only the rows a batch touches), a
    LambdaLR with linear warmup then cosine decay to cfg.min_lr_ratio over `steps`, a torch.Generator seeded with
    `seed` for the batches,
    the precision policy of the parameters' device (cfg.precision) and its GradScaler (fp16 only). With a
    checkpoint `key` ("phase2", "phase3") it resumes from the newest good checkpoint whose `signature` matches
    and that holds exactly the weights `names` (state_dict names; None = all): weights, optimiser, schedule,
    GradScaler and random state, so that a resumed run is bit for bit the uninterrupted one. `resumed`,
    `start` and `history` say what was found; without a checkpoint, `restart()` (when given) puts the weights
    back at the phase's start. A fault guard (`_FaultGuard`) then watches every step. compiled=True (the loop's
    forward runs through torch.compile) times the first step, compile included, and prints it (first_step_s).

    Under `accelerate launch` (N processes, `world()`): cfg.batch_size is each process's batch B, and one step
    takes the N * B rows that one process with batch N * B would draw from the same generator, each process its own
    B of them (`batch`); the loss is averaged over the processes (`update`) and the gradients too (optimizer_step),
    so every process holds the same weights and reaches the same verdict (skip a step, stop). The main process
    resumes first (it may move a checkpoint aside), then the others read what it left; it alone writes checkpoints,
    and a failed write stops every process. A checkpoint does not depend on N: the signature's batch_size is the
    global N * B, so a run resumes with any process count whose N * B is the same.

    Raises what load_checkpoint and the guard raise; see train_superposition for the whole list.
    """

    def __init__(self, name: str, model: torch.nn.Module, params, cfg, *, lr: float, steps: int, warmup: int,
                 seed: int, lr_fix: str, history: dict | None = None, key: str | None = None,
                 signature: dict | None = None, names: list[str] | None = None, embedding=None,
                 embed_lr_mult: float = 1.0, weight_decay: float = 0.0, fresh: bool = False, cache_path=None,
                 restart=None, compiled: bool = False):
        self.name, self.model, self.cfg, self.key = name, model, cfg, key
        self.compiled, self.first_step_s, self._t0 = compiled, None, time.perf_counter()
        self._compiling = compile_progress()
        self.params, self.steps, self.signature, self.names = list(params), steps, signature, names
        lazy = embedding is not None and getattr(cfg, "embedding_update", "dense") == "lazy"
        self.sparse = [m for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.weight is embedding
                       ] if lazy else []  # made sparse for the phase: its backward gives the touched rows only
        for m in self.sparse:
            m.sparse = True
        self.opt = _adamw(self.params, lr, weight_decay, embedding, embed_lr_mult, lazy=lazy)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_schedule(s, steps, warmup, cfg.min_lr_ratio))
        self.gen = torch.Generator().manual_seed(seed)
        self.world = world()
        self.policy = precision_policy(self.params[0].device, cfg.precision)
        self.scaler = make_grad_scaler(self.policy)
        self.history, self.start, self.resumed = history, 0, False
        if key is not None:
            weights = {k: tuple(v.shape) for k, v in model.state_dict().items() if names is None or k in names}
            state = None if fresh else self.world.main_first(  # only the main process moves a checkpoint aside
                lambda main: load_checkpoint(cfg.run_dir, key, signature, weights, set_aside=main))
            if _resume(state, model, self.opt, self.sched, self.gen, names, self.scaler):
                self.history, self.start, self.resumed = state["history"], state["step"], True
                print(f"{name}: resuming at step {self.start} of {steps}" if self.start < steps else
                      f"{name}: already done")
        if not self.resumed and restart is not None:
            restart()  # from scratch: the weights as the phase starts them, whatever they held before
        skipped = self.history.setdefault("skipped", []) if self.history is not None else None
        self.guard = _FaultGuard(name, self.params, lr_fix, cfg.run_dir, cache_path, skipped, self.scaler)

    def bar(self, desc: str, progress: bool = True):
        """The steps still to run, start..steps, as a progress bar."""
        self.first_step_s, self._t0, self._compiling = None, time.perf_counter(), compile_progress()
        return progress_bar(range(self.start, self.steps), desc=desc, disable=not progress)

    def batch(self, num_blocks: int) -> torch.Tensor:
        """cfg.batch_size block indices drawn from the phase's generator: (B,) int64. Under N processes, N * B are
        drawn, as one process with batch N * B draws them, and this process takes its own B (World.share)."""
        idx = torch.randint(num_blocks, (self.cfg.batch_size * self.world.num_processes,), generator=self.gen)
        return self.world.share(idx)

    @property
    def lr(self) -> float:
        """The LR the current step uses (the first parameter group's)."""
        return self.opt.param_groups[0]["lr"]

    def update(self, step: int, loss: torch.Tensor, target=None, stepped: bool | None = None) -> float:
        """One step's bookkeeping: the loss averaged over the processes (the step's loss, as one process with the
        whole batch computes it); a non-finite one raises, naming its cause (target: this process's teacher states,
        checked first); then optimizer_step (clipped to cfg.grad_clip) unless the caller has stepped already
        (`stepped` given, and `loss` then the averaged loss, as superposition_step returns it); a skipped step is
        named and counted; then the schedule moves on. Returns the averaged loss (nats/token for CE), a float."""
        shown = loss.detach() if stepped is not None else self.world.mean(loss.detach())
        self.guard.check_loss(step, shown, target)
        if stepped is None:
            stepped = optimizer_step(loss, self.opt, self.params, self.cfg.grad_clip, self.scaler)
        self.guard.after_step(step, shown, stepped, target)
        self.sched.step()
        if self.compiled and self.first_step_s is None:  # torch.compile's time, apart from the steps' time
            self.first_step_s = time.perf_counter() - self._t0
            (shapes_before, eager_before), (shapes_now, eager_now) = self._compiling, compile_progress()
            if eager_now > eager_before:  # its compile failed (now or before; a warning named why): eager
                what = "; torch.compile failed (see the warning), so every step runs eager"
            elif shapes_now > shapes_before:
                what = ", compiling its forward and backward (COMPILE, once per shape); the others run compiled"
            else:  # a graph this process compiled before for these shapes (another arm, a rerun of the cell)
                what = "; its graph was compiled earlier in this process for these shapes, so every step runs compiled"
            print(f"{self.name}: the first step took {self.first_step_s:.1f} s{what}")
        return shown.item()

    def checkpoint(self, done: int) -> None:
        """Every cfg.ckpt_every steps and at the last one: save the weights `names`, optimiser, schedule, GradScaler
        and random state (atomic; refused when non-finite)."""
        if self.key is not None and _checkpoint_due(self.cfg, done, self.steps):
            with self.world.together():  # the main process writes; a failed write stops every process
                if self.world.is_main_process:
                    _checkpoint_every(self.cfg, self.key, done, self.steps, self.signature, self.model, self.opt,
                                      self.sched, self.gen, self.history, self.names, self.scaler)

    def close(self) -> None:
        """End of the phase: drop gradients and AdamW's moments, and give their memory back; a sparse embedding
        is dense again."""
        for m in self.sparse:
            m.sparse = False
        _free_training_state(self.model, self.opt)
