"""`--mixed-precision auto`: the precision a run computes in on this device, and why.

auto picks bf16 where the device runs it natively: GPUs of compute capability >= 8.0 (Ampere and
newer), and CPUs with AMX or AVX512-BF16 for UNets of at least `CPU_BF16_MIN_PARAMS` parameters;
fp16 (with fp32 master weights, run.place_for_training) on older GPUs; fp32 ("no") otherwise. On
CPU the size matters: bf16 autocast pays on SD-sized convolutions and attention, while a small UNet
spends more on casting than it gains (measured with benchmarks/compare.py; README "Speed").
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from .estimate import component_tensors

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# Measured with benchmarks/compare.py on 2 AMX cores (README "Speed"): the bundled base's 11M-parameter UNet takes
# 1.6x as long per LoRA step in bf16 as in fp32 at 64 px; SD 1.5's 860M takes 0.54x (256 px) and 0.36x (512 px).
# The threshold lies between the two models measured; 300M is a choice within that range, not a measured crossover.
CPU_BF16_MIN_PARAMS = 300_000_000


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native-bf16 instruction sets this CPU reports (Linux /proc/cpuinfo; [] elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return [f for f in CPU_BF16_FLAGS if f in flags]


def choose(requested: str, device_type: str, unet_params: int, *, cuda_capability: tuple[int, int] | None = None,
           gpu_name: str = "", cpu_flags: list[str] | None = None) -> tuple[str, str]:
    """(precision: "no" | "fp16" | "bf16", why) for `--mixed-precision requested` on a device of this type."""
    if requested != "auto":
        return requested, "--mixed-precision " + requested
    if device_type == "cuda":
        major, minor = cuda_capability or (0, 0)
        gpu = f"{gpu_name or 'this GPU'} (compute capability {major}.{minor})"
        if major >= 8:
            return "bf16", f"auto: {gpu} runs bf16 natively"
        return "fp16", f"auto: {gpu} has no fast bf16; fp16 compute, fp32 master weights, loss scaling"
    if device_type != "cpu":
        return "no", f"auto: fp32 on {device_type} (adapt has measured no faster precision there)"
    flags = cpu_bf16_flags() if cpu_flags is None else cpu_flags
    if not flags:
        return "no", "auto: this CPU has no native bf16 (no AMX / AVX512-BF16)"
    if unet_params < CPU_BF16_MIN_PARAMS:
        return "no", (f"auto: this CPU runs bf16 natively ({', '.join(flags)}), but a {unet_params / 1e6:.0f}M-parameter UNet "
                      f"trains faster in fp32 on CPU (bf16 from {CPU_BF16_MIN_PARAMS / 1e6:.0f}M)")
    return "bf16", f"auto: this CPU runs bf16 natively ({', '.join(flags)})"


def choose_for(requested: str, device, unet_params: int) -> tuple[str, str]:
    """`choose` for a torch device (asks torch about a GPU)."""
    device = torch.device(device)
    if device.type == "cuda" and requested == "auto":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return choose(requested, "cuda", unet_params, cuda_capability=torch.cuda.get_device_capability(index),
                      gpu_name=torch.cuda.get_device_name(index))
    return choose(requested, device.type, unet_params)


def choose_for_model(requested: str, device, model: Path) -> tuple[str, str]:
    """`choose_for` with the UNet's size read from the model folder's safetensors headers (nothing loaded)."""
    unet_params = sum(math.prod(shape) for shape, _ in component_tensors(Path(model), "unet").values())
    return choose_for(requested, device, unet_params)


# Autocast saves, for backward, the bf16/fp16 copy it casts of each fp32 trainable weight (860M weights of
# a full SD 1.5 UNet: ~1.1 GiB of copies, alive from forward until backward reaches their layer). The weight
# itself is kept anyway, so these hooks save a note instead and cast again when backward needs it: the same
# values (gradients bit-identical, tests/test_precision.py), one cast more per weight, the copies never held.
class _Recast:
    __slots__ = ("weight", "dtype", "device", "version")

    def __init__(self, weight, copy):
        self.weight, self.dtype, self.device, self.version = weight, copy.dtype, copy.device, weight._version


def _pack(t):
    fn = t.grad_fn
    if fn is not None and fn.name() == "ToCopyBackward0":
        weight = getattr(fn.next_functions[0][0], "variable", None)  # a leaf (AccumulateGrad): a trainable weight
        if weight is not None and weight.dtype != t.dtype and weight.shape == t.shape:
            return _Recast(weight, t)
    return t


def _unpack(t):
    if type(t) is not _Recast:
        return t
    if t.weight._version != t.version:
        raise RuntimeError("a trainable weight changed between forward and backward; its cast copy cannot be remade")
    return t.weight.detach().to(device=t.device, dtype=t.dtype)


def recasts(cfg) -> bool:
    """Whether a run with this TrainConfig (its precision settled) recasts trainable weights in backward."""
    return cfg.recast_weights and not cfg.compile and cfg.mixed_precision != "no"


@contextmanager
def autocast(accelerator, recast: bool):
    """The accelerator's autocast; with `recast` (an accelerator made without autocast's cast cache, run.make_accelerator),
    the cast copies of trainable weights are not kept for backward (above)."""
    hooks = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack) if recast else nullcontext()
    with hooks, accelerator.autocast():
        yield
