"""Loading the teacher and its tokenizer: the Hub, a local folder, or the bundled offline SmolLM2 GGUF."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .config import BUNDLED_GGUF, BUNDLED_INSTALL, BUNDLED_PACKAGE, BUNDLED_TEACHER, check_teacher_name
from .converted import load_via_copy, same_model, same_tokenizer, save_model, save_tokenizer
from .errors import TeacherUnavailableError
from .precision import pick_device, precision_policy

if TYPE_CHECKING:
    from .precision import Precision


def bundled_teacher_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TeacherUnavailableError(f"the bundled teacher is not installed: run `{BUNDLED_INSTALL}`")
    folder = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(folder, BUNDLED_GGUF)):
        raise TeacherUnavailableError(f"{BUNDLED_GGUF} is missing from {folder}: reinstall with "
                                      f"`{BUNDLED_INSTALL} --force-reinstall`")
    return folder


def _hub_error(name: str, err: Exception) -> TeacherUnavailableError:
    return TeacherUnavailableError(
        f"could not load teacher {name!r} ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
        f"If the Hub is unreachable, use the bundled offline teacher: TEACHER_MODEL = {BUNDLED_TEACHER!r} "
        f"(installed by `{BUNDLED_INSTALL}`)")


def _pretrained_args(name: str) -> tuple[str, dict]:
    check_teacher_name(name)
    if name == BUNDLED_TEACHER:
        return bundled_teacher_dir(), {"gguf_file": BUNDLED_GGUF}
    return name, {}


def _bundled_gguf() -> str:
    """The bundled GGUF file's path. Raises TeacherUnavailableError when it is not installed."""
    return os.path.join(bundled_teacher_dir(), BUNDLED_GGUF)


def load_tokenizer(name: str):
    """The teacher's tokenizer, with a pad token (EOS) where it lacks one. The bundled teacher's is read from its
    converted copy in the user cache (spoonfeed.converted), made from its GGUF file on the first load.
    Raises TeacherUnavailableError naming the bundled teacher when the Hub or the folder fails."""
    from transformers import AutoTokenizer

    path, kw = _pretrained_args(name)
    try:
        if name == BUNDLED_TEACHER:
            tok = load_via_copy("tokenizer", _bundled_gguf(), lambda p, k: AutoTokenizer.from_pretrained(p, **k),
                                save_tokenizer, same_tokenizer)
        else:
            tok = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise _hub_error(name, e) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_teacher(name: str, device: str = "auto", tokenizer=None, precision: str = "auto"):
    """(model, tokenizer). The dtype is explicit and comes from precision_policy, whatever the transformers
    version's default: CUDA loads 4-bit NF4 (bitsandbytes) with the policy's teacher dtype as both the dtype of
    the non-quantized parts and the 4-bit compute dtype (bf16 on capability >= 8.0, else float32), or the
    whole model in that dtype without bitsandbytes or for a GGUF file. CPU: bf16 where the CPU has native bf16
    matmul (PRECISION auto or bf16), else float32; never fp16. (For the bundled GGUF teacher in bf16,
    transformers warns that packed GGUF weights are fastest in float32; the file is dequantized on load into
    plain bf16 layers, and bf16 ran 2.36x the original's float32 tokens/s in bench/run.py.) The bundled teacher
    is read from its converted copy in the user cache, one per dtype, made from the GGUF file on the first load
    in that dtype: the same tensors bit for bit (spoonfeed.converted).
    A tokenizer already loaded (load_tokenizer) is passed through instead of loading it again.
    Raises TeacherUnavailableError naming the bundled teacher when the Hub or the folder fails."""
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    policy = precision_policy(dev, precision)
    path, kw = _pretrained_args(name)
    tok = tokenizer if tokenizer is not None else load_tokenizer(name)
    bundled = name == BUNDLED_TEACHER

    def load(path, kw):
        if dev.type == "cuda":
            return _load_cuda_teacher(path, kw, policy, nf4=not bundled)
        return AutoModelForCausalLM.from_pretrained(path, dtype=policy.teacher, **kw).to(dev)

    try:
        if bundled:
            model = load_via_copy(str(policy.teacher).removeprefix("torch."), _bundled_gguf(), load, save_model,
                                  same_model, need=lambda model: model.get_memory_footprint())
        else:
            model = load(path, kw)
    except (OSError, ValueError) as e:
        raise _hub_error(name, e) from e
    model.eval().requires_grad_(False)
    return model, tok


def _load_cuda_teacher(path, kw, policy: Precision, nf4: bool | None = None):
    """The teacher on CUDA: 4-bit NF4 where nf4 (default: unless kw names a GGUF file) and bitsandbytes works,
    else the whole model in the policy's teacher dtype, placed by _device_map."""
    from transformers import AutoModelForCausalLM

    dtype = policy.teacher
    if nf4 if nf4 is not None else "gguf_file" not in kw:
        try:
            from transformers import BitsAndBytesConfig

            bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
            model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=dtype,
                                                         device_map=_device_map(), **kw)
            print(f"teacher: 4-bit NF4, computing in {dtype} ({policy.reason})")
            return model
        except (ImportError, RuntimeError) as e:  # bitsandbytes missing or unsupported on this card
            print(f"4-bit NF4 unavailable ({type(e).__name__}: {e}); loading the teacher in {dtype}")
    else:
        print(f"the bundled GGUF teacher runs dequantized, in {dtype} ({policy.reason})")
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:  # transformers needs it for device_map: load, then move
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).to("cuda")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=_device_map(), **kw)


def _device_map():
    """Where transformers puts the teacher on CUDA: "auto" (every visible GPU) in one process; under `accelerate
    launch`, whole on this process's own GPU (PartialState made it the current one), one copy a process."""
    import torch

    from .parallel import world

    return {"": torch.cuda.current_device()} if world().parallel else "auto"

