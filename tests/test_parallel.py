"""Data parallelism, one process at a time: each process's share of a batch and of the KD positions is what one
process with the whole batch would use, every process reaches the same verdict, only the main process writes, and
a single process (the notebook) runs no collective at all. The runs under `accelerate launch` are in
test_multi_process.py."""
import dataclasses
import functools
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from accelerate import PartialState
from conftest import ROOT, make_teacher, make_tokenizer, tiny_run_config

import spoonfeed.optim
import spoonfeed.phase
import spoonfeed_helpers as sf
import spoonfeed_run
from spoonfeed import parallel
from spoonfeed.errors import ConfigError


def state(n, index):
    """A stand-in for accelerate's PartialState of process `index` of `n`, with accelerate's own
    split_between_processes (the method reads only num_processes and process_index)."""
    ns = SimpleNamespace(num_processes=n, process_index=index, device=torch.device("cpu"))
    ns.split_between_processes = functools.partial(PartialState.split_between_processes, ns)
    return ns


class FakeWorld(parallel.World):
    """Process `index` of `n`, alone in this test: each collective answers as if the other processes had given
    `elsewhere` (their loss, their count of non-finite targets, their gradients), by default what this one gives."""

    def __init__(self, n=2, index=0, loss=None, count=0, grad=None):
        super().__init__(state(n, index))
        self.loss, self.count, self.grad = loss, count, grad

    def mean(self, t):
        return t if self.loss is None else (t + self.loss) / 2

    def sum(self, value):
        return value + self.count

    def gather(self, items):
        return items

    def average_gradients(self, params):
        if self.grad is not None:
            for p in params:
                p.grad = (p.grad + self.grad) / 2

    def wait(self):
        pass


# --- each process's share -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_the_processes_shares_of_a_batch_are_one_process_batch_in_order(n):
    idx = torch.randint(100, (4 * n,))
    shares = [parallel.World(state(n, r)).share(idx) for r in range(n)]
    assert torch.equal(torch.cat(shares), idx)
    assert {len(s) for s in shares} == {4}
    batches = list(range(0, 45, 8))  # Phase 1's batches of 45 blocks: 6, shared 2 + 2 + 1 + 1 over 4 processes
    shares = [parallel.World(state(n, r)).share(range(0, 45, 8)) for r in range(n)]
    assert [i for s in shares for i in s] == batches
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("n,k", [(2, 50), (2, 3), (3, 1), (4, 64)])
def test_kd_positions_split_so_that_the_mean_over_processes_is_the_whole_batch_mean(n, k):
    numel = 32  # each process's positions: B * T
    values = torch.rand(n * numel, dtype=torch.float64)  # a per-position loss over the whole batch
    pos = torch.randperm(n * numel)[:k]
    total, seen = 0.0, []
    for r in range(n):
        mine, factor = parallel.World(state(n, r)).positions(pos, numel)
        assert ((mine >= 0) & (mine < numel)).all()
        seen += (mine + r * numel).tolist()
        local = values[r * numel:(r + 1) * numel]
        total += factor * local[mine].mean().item() if len(mine) else 0.0  # a process with none adds nothing
    assert sorted(seen) == sorted(pos.tolist())
    assert total / n == pytest.approx(values[pos].mean().item(), rel=1e-12)


def _phase(cfg, batch_size):
    model = torch.nn.Linear(2, 2)
    return spoonfeed.phase.Phase("test", model, model.parameters(), dataclasses.replace(cfg, batch_size=batch_size),
                                 lr=1e-3, steps=10, warmup=0, seed=7, lr_fix="")


def test_two_processes_of_batch_b_draw_the_blocks_one_process_of_batch_2b_draws(tmp_path, patch):
    cfg = tiny_run_config(tmp_path)
    one = _phase(cfg, 4)
    worlds = iter([FakeWorld(index=0), FakeWorld(index=1)])
    patch(spoonfeed.phase, "world", lambda: next(worlds))
    ranks = [_phase(cfg, 2), _phase(cfg, 2)]
    for _ in range(5):
        assert torch.equal(torch.cat([r.batch(24) for r in ranks]), one.batch(24))


def test_the_signature_counts_the_global_batch_so_a_resume_may_change_the_process_count(tiny_cache, patch):
    cfg, cache, _ = tiny_cache
    model = sf.build_student(cfg, cache)
    one = sf._signature(dataclasses.replace(cfg, batch_size=4), "phase2", model, cache)
    patch(sf, "world", lambda: FakeWorld(n=2))
    two = sf._signature(dataclasses.replace(cfg, batch_size=2), "phase2", model, cache)
    assert two == one and two["batch_size"] == 4


# --- the same verdict on every process -------------------------------------------------------------------------

def test_a_non_finite_loss_on_another_process_stops_this_one_naming_the_same_cause(tiny_cache, patch):
    """Another process drew a batch whose teacher targets hold NaN: its loss is NaN, so the mean is. This process's
    own batch is clean, yet it stops at the same step with the same error, and nothing was stepped or saved."""
    cfg, cache, _ = tiny_cache
    model = sf.build_student(cfg, cache)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fake = FakeWorld(loss=torch.tensor(float("nan")), count=5)
    for module in (sf, spoonfeed.phase, spoonfeed.optim):
        patch(module, "world", lambda: fake)
    with pytest.raises(sf.NonFiniteTargetError, match="hold 5 non-finite values"):
        sf.train_superposition(model, cache, cfg, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not (sf.Path(cfg.run_dir) / "checkpoints").exists()


def test_a_non_finite_gradient_on_another_process_skips_the_step_here_too(patch):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    patch(spoonfeed.optim, "world", lambda: FakeWorld(grad=torch.tensor(float("nan"))))
    loss = model(torch.ones(4, 3)).pow(2).mean()  # finite here
    assert spoonfeed.optim.optimizer_step(loss, opt, list(model.parameters()), 1.0) is False
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_gradients_averaged_over_processes_are_the_whole_batch_gradient():
    """What World.average_gradients computes (the mean of each process's gradient of its own mean loss) is the
    gradient of the mean loss over the whole batch, for processes of equal batches."""
    torch.manual_seed(0)
    model, x = torch.nn.Linear(5, 3), torch.randn(8, 5)
    grads = []
    for part in (x[:4], x[4:], x):
        model.zero_grad()
        model(part).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b, whole in zip(*grads):
        assert torch.allclose((a + b) / 2, whole, atol=1e-6)


def test_gradient_averaging_writes_every_bucket_back_and_leaves_unused_parameters_alone(monkeypatch):
    """Outside a launcher accelerate's reduce is the identity, so World.average_gradients must give every gradient
    back as it was, across several buckets; a parameter no process computed a gradient for keeps none (AdamW
    skips it, as in one process), and a frozen one is not touched."""
    monkeypatch.setattr(parallel, "GRAD_BUCKET", 5)  # 6 + 2 + 4 elements: several buckets
    a, b, c = torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(2)), torch.nn.Parameter(
        torch.randn(4))
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    (a.sum() * 2 + (b * torch.arange(2.0)).sum()).backward()  # c gets no gradient
    before = [a.grad.clone(), b.grad.clone()]
    parallel.World(state(2, 0)).average_gradients([a, b, c, frozen])
    assert torch.equal(a.grad, before[0]) and torch.equal(b.grad, before[1])
    assert c.grad is None and frozen.grad is None


def test_a_sparse_embedding_gradient_is_averaged_over_the_rows_every_process_touched():
    """EMBEDDING_UPDATE = "lazy": each process's gradient holds only the rows its batch touched. The average holds
    the rows of the whole batch, each the sum over processes divided by N: here the other process touched rows 1
    and 3 with the same values, so rows 1 and 3 keep their values and row 5 (this process's alone) is halved."""
    class Other(parallel.World):
        def gather(self, items):
            ((_, values),) = items
            return items + [(torch.tensor([[1, 3]]), values[:2])]

    emb = torch.nn.Embedding(6, 2, sparse=True)
    emb(torch.tensor([1, 3, 5])).sum().backward()
    Other(state(2, 0)).average_gradients([emb.weight])
    g = emb.weight.grad
    assert g.is_sparse and g.indices().tolist() == [[1, 3, 5]]
    assert torch.equal(g.to_dense()[[1, 3]], torch.ones(2, 2)) and torch.equal(g.to_dense()[5], torch.full((2,), 0.5))


def test_one_failure_inside_together_is_raised_on_every_process():
    class Gathered(parallel.World):
        def __init__(self, index, others):
            super().__init__(state(2, index))
            self.others = others

        def gather(self, items):
            return items + self.others

    with pytest.raises(ConfigError, match="process 0 of 2 stopped the run: disk full"), \
            Gathered(1, [(0, ConfigError, "disk full")]).together():
        pass  # this process was fine
    with pytest.raises(ValueError, match="mine"), Gathered(0, [None]).together():  # the failed one: its own
        raise ValueError("mine")

    class Odd(Exception):
        def __init__(self, a, b):
            super().__init__(f"{a} {b}")

    with pytest.raises(RuntimeError, match="process 0 of 2 stopped the run: Odd: x y"), \
            Gathered(1, [(0, Odd, "x y")]).together():
        pass


# --- only the main process writes ------------------------------------------------------------------------------

@pytest.mark.parametrize("index", [0, 1])
def test_only_the_main_process_writes_checkpoints_and_only_it_moves_one_aside(tiny_cache, patch, index):
    cfg, cache, _ = tiny_cache
    cfg = dataclasses.replace(cfg, superposition_steps=4, ckpt_every=2, eval_every=4)
    ckpts = sf.Path(cfg.run_dir) / "checkpoints"
    ckpts.mkdir(parents=True)
    torch.save({"signature": {"other": "settings"}}, ckpts / "phase2.pt")  # made with other settings
    fake = FakeWorld(index=index)
    for module in (sf, spoonfeed.phase):
        patch(module, "world", lambda: fake)
    sf.train_superposition(sf.build_student(cfg, cache), cache, cfg, progress=False)
    names = sorted(p.name for p in ckpts.iterdir())
    if index == 0:
        assert names == ["phase2.other-settings.pt", "phase2.prev.pt", "phase2.pt"]
        assert torch.load(ckpts / "phase2.pt")["step"] == 4
    else:  # the other file is left where it is, for the main process to move; nothing is written
        assert names == ["phase2.pt"] and torch.load(ckpts / "phase2.pt")["signature"] == {"other": "settings"}


# --- one process: the notebook ---------------------------------------------------------------------------------

def test_one_process_runs_no_collective_and_imports_no_accelerate():
    assert parallel.world() is parallel.ONE
    one, t = parallel.ONE, torch.ones(3)
    assert one.mean(t) is t and one.share(t) is t and one.gather([1]) == [1] and one.sum(2.0) == 2.0
    assert one.positions(t, 3) == (t, 1.0) and one.on_main(lambda: 5) == 5 and one.main_first(lambda main: main)
    code = "import sys, spoonfeed_helpers; assert 'accelerate' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_under_several_processes_each_loads_the_teacher_whole_on_its_own_gpu(patch):
    import spoonfeed.teacher

    assert spoonfeed.teacher._device_map() == "auto"  # one process: transformers spreads it over every GPU
    patch(parallel, "world", lambda: FakeWorld())
    patch(torch.cuda, "current_device", lambda: 3)
    assert spoonfeed.teacher._device_map() == {"": 3}


# --- the entry point -------------------------------------------------------------------------------------------

def test_settings_on_the_command_line_are_python_literals_or_text():
    assert spoonfeed_run.parse_settings(["batch_size=2", "lr=2e-3", "teacher=smollm2", "head_bias=False",
                                         "ablation_widths=(128, 256)", "run_dir=runs/a=b"]) == {
        "batch_size": 2, "lr": 2e-3, "teacher": "smollm2", "head_bias": False, "ablation_widths": (128, 256),
        "run_dir": "runs/a=b"}
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        spoonfeed_run.parse_settings(["batch_size"])
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        spoonfeed_run.main(["--set", "batchsize=2"])


def test_every_set_wins_over_the_preset_even_at_the_forms_default(monkeypatch):
    """The cpu preset's Phase 4 is 110 steps at LR 2e-3; the form's are 150 and 1e-3. `--set` says what the user
    wants, at any value: a --set equal to the form's default is not 'left alone' (it was dropped, silently)."""
    default, cpu = sf.RunConfig(), sf.PRESETS["cpu"]
    assert (cpu["logit_kd_steps"], cpu["logit_kd_lr"]) != (default.logit_kd_steps, default.logit_kd_lr)

    class Got(Exception):  # the config as the run would use it, caught before any work
        pass

    def got(cfg, *a, **k):
        raise Got(cfg)

    monkeypatch.setattr(spoonfeed_run, "check_launch_devices", got)
    with pytest.raises(Got) as e:
        spoonfeed_run.main(["--preset", "cpu", "--set", f"LOGIT_KD_STEPS={default.logit_kd_steps}",
                            "--set", f"logit_kd_lr={default.logit_kd_lr}"])
    cfg = e.value.args[0]
    assert (cfg.logit_kd_steps, cfg.logit_kd_lr) == (default.logit_kd_steps, default.logit_kd_lr)
    assert cfg.lm_head_steps == cpu["lm_head_steps"]  # what was not --set is the preset's


_WRONG_TYPE = {"int": "abc", "float": "abc", "str": "3", "bool": "maybe", "tuple": "abc"}


@pytest.mark.parametrize("field", [f.name for f in __import__("dataclasses").fields(sf.RunConfig)])
def test_set_takes_a_field_or_its_form_name_and_every_error_names_the_name_typed(field):
    """`--set` takes each setting by its RunConfig field (lr) and by the form name the notebook and the docs show
    (LEARNING_RATE); given a value of the wrong type, the one error names what was typed, not the other name."""
    import dataclasses

    kind = {f.name: f.type for f in dataclasses.fields(sf.RunConfig)}[field]
    names = [field] + ([sf.FORM_NAMES[field]] if field in sf.FORM_NAMES else [])
    for name in names:
        with pytest.raises(ConfigError) as e:
            spoonfeed_run.main(["--preset", "smoke", "--set", f"{name}={_WRONG_TYPE[kind]}"])
        said = str(e.value)
        assert said.startswith(f"{name}="), said
        assert not any(other in said for other in names if other != name and other not in name), said
        value = getattr(sf.make_config("smoke"), field)
        assert sf.settings_by_field({name: value}) == ({field: value}, {field: name})  # accepted by either name
    assert sf.make_config("smoke", **sf.settings_by_field({names[-1]: getattr(sf.RunConfig, field)})[0])


def test_set_with_a_misspelt_or_doubled_name_is_refused_with_the_nearest_of_both_kinds():
    with pytest.raises(ConfigError, match="did you mean 'LEARNING_RATE'"):
        spoonfeed_run.main(["--set", "LEARNIG_RATE=1e-3"])
    with pytest.raises(ConfigError, match="did you mean 'student_dim'"):
        spoonfeed_run.main(["--set", "studnt_dim=64"])
    with pytest.raises(ConfigError, match="lr and LEARNING_RATE are one setting"):
        spoonfeed_run.main(["--set", "lr=1e-3", "--set", "LEARNING_RATE=2e-3"])


def test_a_run_check_after_the_settings_names_them_as_typed(monkeypatch):
    """The checks spoonfeed_run makes after make_config (the global batch against the cache) name the settings as
    --set typed them too."""
    monkeypatch.setattr(spoonfeed_run, "world", lambda: type("W", (), {"num_processes": 4, "is_main_process": True,
                                                                       "parallel": False})())
    with pytest.raises(ConfigError, match=r"num_samples=16 \(4 processes of BATCH_SIZE=8"):
        spoonfeed_run.main(["--preset", "smoke", "--set", "BATCH_SIZE=8", "--set", "num_samples=16"])


# What each launcher path puts in the environment of the processes it starts, as recorded from accelerate 1.16 and
# torch 2.13 (a script that printed its environment), less the variables no check reads. accelerate's simple launcher
# exports no process count: only MASTER_ADDR/MASTER_PORT, when asked for more than one process
_SIMPLE = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}
_ASKED = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def _torchrun(rank, n, **extra):
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "RANK": str(rank), "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "GROUP_WORLD_SIZE": "1",
            "TORCHELASTIC_RUN_ID": "none", **extra}


LAUNCHES = {  # the command -> (the environment of one process it starts, whether that process must refuse to run)
    "python -m spoonfeed_run": ({}, False),
    "accelerate launch": ({**_SIMPLE, "ACCELERATE_USE_CPU": "False"}, False),
    "accelerate launch --cpu": ({**_SIMPLE, "ACCELERATE_USE_CPU": "True"}, False),
    "accelerate launch --num_processes 1": ({**_SIMPLE, "ACCELERATE_USE_CPU": "False"}, False),
    # asked for 2, started 1: with fewer than 2 visible GPUs accelerate does not turn --multi_gpu on
    "accelerate launch --num_processes 2 (fewer than 2 GPUs)": ({**_SIMPLE, "ACCELERATE_USE_CPU": "False", **_ASKED},
                                                                True),
    "accelerate launch --cpu --num_processes 2": ({**_SIMPLE, "ACCELERATE_USE_CPU": "True", **_ASKED}, True),
    "accelerate launch --num_machines 2 --num_processes 2": ({**_SIMPLE, "ACCELERATE_USE_CPU": "False", **_ASKED,
                                                              "MASTER_ADDR": "10.0.0.1"}, True),
    # torchrun: accelerate's multi-GPU launcher (--multi_gpu, or 2 GPUs or more seen), or torchrun itself
    "accelerate launch --multi_gpu --num_processes 2, rank 0": ({**_SIMPLE, **_torchrun(0, 2)}, False),
    "accelerate launch --multi_gpu --num_processes 2, rank 1": ({**_SIMPLE, **_torchrun(1, 2)}, False),
    "torchrun --nproc_per_node 2": (_torchrun(1, 2, MASTER_ADDR="localhost"), False),
    "torchrun --nproc_per_node 1": (_torchrun(0, 1, MASTER_ADDR="localhost"), False),
    # the simple launcher's one way to several CPU processes: mpirun, which sets its own world size
    "accelerate launch --cpu --mpirun_hostfile h --num_processes 2 (Open MPI)": (
        {**_SIMPLE, "ACCELERATE_USE_CPU": "True", **_ASKED, "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"},
        False),
    "accelerate launch --cpu --mpirun_hostfile h --num_processes 2 (MPICH)": (
        {**_SIMPLE, "ACCELERATE_USE_CPU": "True", **_ASKED, "PMI_SIZE": "2", "PMI_RANK": "0"}, False),
}


@pytest.mark.parametrize("command", LAUNCHES)
def test_a_launch_that_asked_for_several_processes_and_started_one_is_refused_naming_the_command(command):
    env, refused = LAUNCHES[command]
    if not refused:
        spoonfeed_run.check_launch(env)
        return
    with pytest.raises(ConfigError, match="started one process, not N") as err:
        spoonfeed_run.check_launch(env)
    for fix in ("accelerate launch --multi_gpu --num_processes N -m spoonfeed_run", "torchrun --nproc_per_node N",
                "drop --num_processes"):
        assert fix in str(err.value), fix


def test_the_launch_is_refused_before_any_work(tmp_path, monkeypatch):
    """main checks the launch first: before the settings are read, the PartialState is made or a folder written."""
    import accelerate

    for k, v in LAUNCHES["accelerate launch --num_processes 2 (fewer than 2 GPUs)"][0].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(accelerate, "PartialState", lambda *a, **k: pytest.fail("PartialState made"))
    with pytest.raises(ConfigError, match="started one process"):
        spoonfeed_run.main(["--preset", "smoke", "--set", f"run_dir={tmp_path / 'run'}",
                            "--set", f"cache_dir={tmp_path / 'cache'}"])
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_a_cuda_run_with_more_processes_on_this_machine_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cuda, cpu = sf.RunConfig(device="cuda"), sf.RunConfig(device="cpu")
    with pytest.raises(ConfigError, match="2 processes on this machine but 1 CUDA GPUs"):
        spoonfeed_run.check_launch_devices(cuda, _torchrun(1, 2))
    spoonfeed_run.check_launch_devices(cpu, _torchrun(1, 2))  # CPU processes (gloo)
    spoonfeed_run.check_launch_devices(cuda, {})  # one process
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    spoonfeed_run.check_launch_devices(cuda, _torchrun(1, 2))


def _tiny_run_args(tmp_path, lm_head_steps: int):
    """(cfg, spoonfeed_run arguments) for a one-process run on a tiny teacher saved in tmp_path, every setting
    passed with --set, as a user of spoonfeed_run would."""
    teacher = tmp_path / "teacher"
    make_teacher().save_pretrained(teacher)
    make_tokenizer().save_pretrained(teacher)
    cfg = tiny_run_config(tmp_path, teacher=str(teacher), superposition_steps=4, lm_head_steps=lm_head_steps,
                          eval_every=2, ckpt_every=2, precision="fp32")
    keys = ("teacher", "dataset", "num_samples", "val_samples", "seq_len", "student_dim", "student_layers",
            "student_heads", "superposition_steps", "lm_head_steps", "batch_size", "lr", "head_lr",
            "warmup_steps", "eval_every", "ckpt_every", "cache_batch_size", "cache_dir", "run_dir", "device",
            "precision")
    return cfg, ["--preset", "none", *[a for k in keys for a in ("--set", f"{k}={getattr(cfg, k)}")]]


@pytest.mark.slow  # Phase 1 on the tiny teacher, the plots and the exports: about 30 s
def test_one_process_run_makes_the_notebooks_calls_and_writes_run_json(tmp_path):
    cfg, args = _tiny_run_args(tmp_path, lm_head_steps=2)
    result = spoonfeed_run.main(args)
    saved = sf.json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["processes"] == 1 and saved["global_batch_size"] == cfg.batch_size
    assert saved["phase2"]["loss"] == result["phase2"]["loss"] and len(saved["phase2"]["loss"]) == 4
    assert saved["metrics"]["student_ce"] == pytest.approx(result["metrics"]["student_ce"])
    for name in ("student", "student-ternary", "plots/5_evaluation.png", "checkpoints/phase2.pt"):
        assert (tmp_path / "run" / name).exists(), name
    assert result["logit_kd"] is None and not (tmp_path / "run" / "plots/4_logit_kd.png").exists()


@pytest.mark.slow  # Phase 1 on the tiny teacher, three short runs, the plots and the exports: about 60 s
def test_recipe_spoonfeed_kd_runs_phase_4_after_the_head_fit_resumes_it_done_and_switching_back_drops_its_plot(
        tmp_path, capsys):
    _, args = _tiny_run_args(tmp_path, lm_head_steps=3)
    kd = [*args, "--set", "RECIPE=spoonfeed+kd", "--set", "LOGIT_KD_STEPS=5"]
    first = spoonfeed_run.main(kd)
    run = tmp_path / "run"
    assert first["phase3"]["step"] == [] and first["phase3"]["eval_step"] == [0]  # the closed-form fit alone
    assert first["logit_kd"]["step"] == list(range(5)) and first["logit_kd"]["eval_step"] == [0, 2, 4, 5]
    assert first["logit_kd"]["val_ce"][0] == pytest.approx(first["phase3"]["val_ce"][-1], abs=1e-4)
    assert first["metrics"]["student_ce"] == pytest.approx(first["logit_kd"]["val_ce"][-1], abs=1e-4)
    for name in ("plots/4_logit_kd.png", "checkpoints/logit_kd.pt", "student-hf"):
        assert (run / name).exists(), name
    capsys.readouterr()
    again = spoonfeed_run.main(kd)  # "Run all" again: every phase found finished, nothing retrained
    out = capsys.readouterr().out
    assert "logit KD: already done" in out, out
    assert again["logit_kd"]["loss"] == first["logit_kd"]["loss"]
    assert again["metrics"]["student_ce"] == pytest.approx(first["metrics"]["student_ce"], abs=1e-6)
    back = spoonfeed_run.main(args)  # RECIPE back to "spoonfeed": Phase 3 trains, no Phase 4, no stale plot
    assert back["logit_kd"] is None and back["phase3"]["step"] == [0, 1, 2]
    assert not (run / "plots/4_logit_kd.png").exists()


def test_a_spoonfeed_malloc_neither_on_nor_off_stops_spoonfeed_run_before_any_folder_is_made(tmp_path, monkeypatch):
    import spoonfeed_run

    monkeypatch.setenv("SPOONFEED_MALLOC", "maybe")
    with pytest.raises(sf.ConfigError, match="SPOONFEED_MALLOC"):
        spoonfeed_run.main(["--preset", "smoke", "--set", f"run_dir={tmp_path / 'run'}",
                            "--set", f"cache_dir={tmp_path / 'cache'}"])
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
