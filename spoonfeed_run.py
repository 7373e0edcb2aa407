"""Headless runs of the notebook's path, one process or several: Phase 1, RECIPE's phases, evaluation, export.

    python -m spoonfeed_run --preset smoke                                        # one process
    accelerate launch --multi_gpu --num_processes 4 -m spoonfeed_run --preset cpu --set device=cuda   # 4 GPUs
    accelerate launch --multi_gpu --num_processes 2 -m spoonfeed_run --preset smoke   # 2 CPU processes (gloo)

It makes the same helper calls as the notebook's cells 2 to 9, with the same presets and settings
(spoonfeed.config.make_config): the checks made before work, cache_teacher_states (each process runs the teacher
on its share of the blocks), build_student, train_superposition, train_lm_head and, under RECIPE "spoonfeed+kd",
train_logit_kd (data-parallel: BATCH_SIZE is each process's batch, the gradients are averaged), evaluate, the
plots and export_all (the main process). It then writes RUN_DIR/run.json: the settings, the process count, the
phases' histories and the held-out figures. The notebook itself stays one process. Generation and the ablation
are the notebook's (cells 10 to 12).
See docs/multi-gpu.md.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import sys

import spoonfeed_helpers as sf
from spoonfeed.errors import ConfigError
from spoonfeed.files import _atomic_write_text
from spoonfeed.parallel import world


def parse_settings(pairs) -> dict:
    """`--set NAME=VALUE` pairs -> {NAME: value}: the value as a Python literal (4, 2e-3, False, "128,256" stays a
    string, (128, 256) a tuple), else as the text itself (smollm2, stdlib). NAME is a RunConfig field (lr) or its
    form setting (LEARNING_RATE), as the notebook and the docs show it: settings_by_field resolves and checks it.
    Raises ConfigError for a pair without '='."""
    settings = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--set {pair!r} must be NAME=VALUE with NAME a setting, e.g. --set batch_size=4, "
                              "--set BATCH_SIZE=4 or --set teacher=smollm2")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        settings[name.strip()] = value
    return settings


WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")  # as PartialState reads


def check_launch(env=os.environ) -> None:
    """Refuse, before any work, a launch that asked for several processes and started this one alone.

    `accelerate launch --num_processes N` (N > 1) runs accelerate's simple launcher with --cpu, and also without
    --cpu whenever fewer than 2 GPUs are visible and --multi_gpu is not given (it turns --multi_gpu on by itself only
    when it sees 2 GPUs or more). That launcher starts one process unless an MPI hostfile is given
    (huggingface/accelerate#2741), and would train at 1/N of the global batch. It exports no process count: it sets
    ACCELERATE_USE_CPU (True or False) in every launch, and MASTER_ADDR only when asked for more than one process or
    machine (accelerate 1.16, utils/launch.py: prepare_simple_launcher_cmd_env). torchrun (`--multi_gpu`, or
    `torchrun` itself) sets WORLD_SIZE and no ACCELERATE_USE_CPU; mpirun sets its own world size
    (PMI_SIZE, OMPI_COMM_WORLD_SIZE). So: the simple launcher's variables with MASTER_ADDR, and no world of more than
    one process (WORLD_SIZE_VARS), is a launch of N that started 1. Raises ConfigError naming the commands that
    start N processes; nothing for `python -m spoonfeed_run`, a plain `accelerate launch` and every launch that did
    start its processes."""
    world_size = next((int(env[k]) for k in WORLD_SIZE_VARS if env.get(k)), 1)
    if "ACCELERATE_USE_CPU" in env and env.get("MASTER_ADDR") and world_size == 1:
        raise ConfigError(
            "this `accelerate launch --num_processes N` started one process, not N: without --multi_gpu, accelerate "
            "runs its simple launcher (always with --cpu, and with fewer than 2 visible GPUs), which starts one. "
            "For N processes add --multi_gpu: `accelerate launch --multi_gpu --num_processes N -m spoonfeed_run ...` "
            "(torchrun; for a run whose device is cpu, such as the cpu and smoke presets, the processes are CPU "
            "processes that talk through gloo), or `torchrun --nproc_per_node N -m spoonfeed_run ...`. For one "
            "process, drop --num_processes or run `python -m spoonfeed_run ...`")


def check_launch_devices(cfg, env=os.environ) -> None:
    """Refuse, before any work, a CUDA run with more processes on this machine than GPUs: each process takes the GPU
    of its local rank (LOCAL_RANK), so one past the last would fail inside accelerate. Raises ConfigError naming the
    fix. Nothing for one process or a CPU run."""
    import torch

    local = int(env.get("LOCAL_WORLD_SIZE") or 1)
    if local > 1 and sf.pick_device(cfg.device).type == "cuda" and local > torch.cuda.device_count():
        raise ConfigError(f"{local} processes on this machine but {torch.cuda.device_count()} CUDA GPUs: each process "
                          "needs its own GPU. Lower --num_processes (or --nproc_per_node) to the GPU count, or set "
                          "device=cpu for CPU processes")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spoonfeed_run", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Settings are RunConfig's fields (spoonfeed/config.py) or the notebook's form "
                                       "names (LEARNING_RATE or lr); errors name them as typed. BATCH_SIZE "
                                       "is each process's batch. See docs/multi-gpu.md.")
    p.add_argument("--preset", default=None, help="cpu, smoke or none (the form's defaults); default: "
                                                  "SPOONFEED_PRESET from the environment")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="settings",
                   help="a setting, e.g. --set batch_size=4 --set LEARNING_RATE=1e-3 (repeatable)")
    p.add_argument("--retrain", action="store_true", help="train Phases 2, 3 and 4 afresh (the notebook's RETRAIN)")
    p.add_argument("--gguf-qtype", default="TQ2_0", help="the GGUF's weight type (GGUF_QTYPE): TQ2_0, TQ1_0, F16")
    return p


def main(argv=None) -> dict:
    """The run, on this process; returns what run.json holds. Raises ConfigError before any work for a bad setting
    or launch (check_launch, check_launch_devices; make_config checks the device), and whatever the phases raise
    (every process the same, see World.together)."""
    args = _parser().parse_args(argv)
    with sf.headless():  # a fix that names a notebook cell names the command instead (spoonfeed.errors.in_notebook)
        check_launch()
        preset = sf.resolve_preset(args.preset)
        settings, typed = sf.settings_by_field(parse_settings(args.settings))
        with sf.named_as(typed):  # every error of the run names a setting as --set typed it
            return _main(args, preset, settings)


def _main(args, preset, settings) -> dict:
    cfg = sf.make_config(preset, explicit=settings, **settings)  # every --set wins over the preset, at any value
    sf.check_export_settings(args.gguf_qtype)
    check_launch_devices(cfg)
    os.environ.setdefault("MPLBACKEND", "Agg")  # plots go to files
    from accelerate import PartialState

    # CPU processes talk through gloo: PartialState picks it only when told the run is on the CPU
    state = PartialState(cpu=sf.pick_device(cfg.device).type == "cpu")
    ranks = world()
    try:
        with contextlib.ExitStack() as stack:
            if not ranks.is_main_process:  # one process prints
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            return _run(cfg, preset, args, ranks, state)
    except Exception as e:  # under several processes, one line each says which stopped, and why
        if ranks.parallel:
            print(f"spoonfeed_run: process {ranks.process_index} of {ranks.num_processes} stopped: "
                  f"{type(e).__name__}: {str(e)[:300]}", file=sys.stderr, flush=True)
        raise
    finally:
        if ranks.parallel:
            state.destroy_process_group()


def _run(cfg, preset, args, ranks, state) -> dict:
    n, main = ranks.num_processes, ranks.is_main_process
    sf.check_batch_size(cfg.batch_size * n, cfg.num_samples, f"{sf.setting('num_samples')}={cfg.num_samples} ({n} "
                        f"processes of {sf.setting('batch_size')}={cfg.batch_size} draw {cfg.batch_size * n} blocks a "
                        "step)")
    print(sf.describe(cfg, preset))
    print(f"processes: {n}" + (f" ({state.distributed_type.value}, {state.backend})" if n > 1 else "")
          + f"; batch_size {cfg.batch_size} a process, {cfg.batch_size * n} blocks a step")
    sf.check_runtime(cfg, preset)
    malloc = sf.keep_freed_memory(sf.pick_device(cfg.device))  # CPU + glibc: a step reuses big tensors' memory
    print(sf.check_folders(cfg, ablation=False))  # (after: a bad SPOONFEED_MALLOC is refused before any folder)
    print("device:", sf.pick_device(cfg.device), "|", sf.precision_policy(cfg.device, cfg.precision).reason,
          *(["|", malloc] if malloc else []))

    cache = sf.cache_teacher_states(cfg, progress=main)  # cell 3
    tokenizer = sf.load_tokenizer(cfg.teacher)
    student = sf.build_student(cfg, cache)  # cell 4
    history2 = sf.train_superposition(student, cache, cfg, progress=main, fresh=args.retrain)  # cell 5
    history3 = sf.train_lm_head(student, cache, cfg, progress=main, fresh=args.retrain)  # cell 6
    history4 = sf.train_logit_kd(student, cache, cfg, progress=main, checkpoint=True, fresh=args.retrain) \
        if "logit_kd" in sf.recipe_phases(cfg.recipe) else None  # cell 7
    report = sf.evaluate(student, cache, precision=cfg.precision)  # cell 8
    print(sf.format_report(report))
    result = {"preset": preset, "processes": n, "batch_size": cfg.batch_size, "global_batch_size": cfg.batch_size * n,
              "config": {k: v for k, v in vars(cfg).items()}, "cache": str(cache.path),
              "phase2": history2, "phase3": history3, "logit_kd": history4, "metrics": report["metrics"]}
    with ranks.together():  # the main process writes the plots, the exports and run.json; a failure stops all
        if main:
            plots = sf.run_path(cfg.run_dir, "plots")
            sf.plot_cache(cache, sf.run_path(cfg.run_dir, "plots/1_cache.png"))
            sf.plot_phase2(history2, sf.run_path(cfg.run_dir, "plots/2_superposition.png"))
            sf.plot_phase3(history3, path=sf.run_path(cfg.run_dir, "plots/3_lm_head.png"))
            sf.plot_logit_kd(history4, sf.run_path(cfg.run_dir, "plots/4_logit_kd.png"))
            sf.plot_evaluation(report, sf.run_path(cfg.run_dir, "plots/5_evaluation.png"))
            exported = sf.export_all(student, tokenizer, cfg.run_dir, cache, cfg, report, args.gguf_qtype)  # cell 9
            result["exported"] = {k: str(v) for k, v in exported.items()}
            path = sf.run_path(cfg.run_dir, "run.json")
            _atomic_write_text(path, json.dumps(result, indent=1, default=str))
            print(f"done: {path}, {plots}/, " + ", ".join(result["exported"].values()))
    return result


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:  # a bad setting or launch: one line, no traceback
        print(f"spoonfeed_run: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
