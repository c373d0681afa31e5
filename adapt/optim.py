"""The optimizer and its learning-rate schedule: the method's parameter groups with their own learning rates
(--text-encoder-lr, --embedding-lr, LoRA+), groups that stop early (pivotal tuning's embedding), --optimizer
(AdamW with its kernel, 8-bit AdamW, Prodigy, schedule-free AdamW), stepping it inside backward (--fused-backward)
and --lr-scheduler. run.setup builds them."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable

import torch
from diffusers.optimization import get_scheduler

from .errors import AdaptError
from .estimate import choose_fused_backward
from .logs import check_installed, optional_import
from .train_config import OPTIMIZER_PACKAGES, TrainConfig

log = logging.getLogger("adapt")


def make_schedule(cfg: TrainConfig, method, components, params: list, n_proc: int):
    """The optimizer over the method's parameter groups and the LR schedule (accelerate steps it once
    per process per optimizer step); groups the method trains for fewer steps stop (stop_groups)."""
    stops = method.group_steps()
    groups = param_groups(cfg, method.parameter_groups(components), params, stops)
    plain = [{k: v for k, v in g.items() if k != "steps"} for g in groups]
    if fused_backward(cfg, sum(p.numel() for p in params), n_proc):
        optimizer = StepInBackward(plain, lambda one: make_optimizer(cfg, one), cfg.max_grad_norm)
    else:
        optimizer = make_optimizer(cfg, plain)
    lr_scheduler = get_scheduler(schedule_name(cfg), optimizer, num_warmup_steps=cfg.warmup_steps * n_proc,
                                 num_training_steps=cfg.steps * n_proc)
    stop_groups(lr_scheduler, [g.get("steps") for g in groups], n_proc)
    return optimizer, lr_scheduler


def schedule_name(cfg: TrainConfig) -> str:
    """diffusers' schedule for the run. Its "constant" ignores a warm-up, so --warmup-steps with it takes
    "constant_with_warmup" (the same lr once warm); schedule-free-adamw warms up itself, then holds its lr."""
    if cfg.optimizer == "schedule-free-adamw":
        return "constant"
    return "constant_with_warmup" if cfg.lr_scheduler == "constant" and cfg.warmup_steps else cfg.lr_scheduler


def stop_groups(lr_scheduler, steps: list[int | None], n_proc: int) -> None:
    """Optimizer group i learns during its first steps[i] optimizer steps (None: all), then at lr 0, with which AdamW
    (also 8-bit) and Prodigy leave its weights as they are (pivotal tuning's embedding; diffusers' advanced DreamBooth
    script also sets that group's lr to 0 at its pivot). The schedule's step counter, which checkpoints hold, decides."""
    def until(f, end: int):
        return lambda epoch: f(epoch) if epoch < end else 0.0

    if any(steps):  # diffusers' schedules are all LambdaLR: one factor per group
        lr_scheduler.lr_lambdas = [f if s is None else until(f, s * n_proc) for f, s in zip(lr_scheduler.lr_lambdas, steps)]


def param_groups(cfg: TrainConfig, groups: dict[str, list], params: list, stops: dict[str, int] | None = None) -> list[dict]:
    """The optimizer's parameter groups: each parameter takes the lr of its method group (TrainConfig.group_lr);
    parameters with equal lrs share one group, in `params` order, so a run without per-group lrs has the one
    group it always had (same updates, and its checkpoints resume as before). A method group that learns for
    fewer steps (`stops`, Method.group_steps) is a group of its own, with its "steps"."""
    stops = stops or {}
    lr_of = {id(p): (cfg.group_lr(name), stops.get(name)) for name, ps in groups.items() for p in ps}
    if lr_of.keys() != {id(p) for p in params} or sum(map(len, groups.values())) != len(params):
        raise AdaptError(f"the method's parameter groups ({', '.join(groups)}) do not hold each trainable parameter once")
    unused = [flag for flag, used in (("--text-encoder-lr", cfg.text_encoder_lr is None or "text_encoder" in groups),
                                      ("--embedding-lr", cfg.embedding_lr is None or "embedding" in groups),
                                      ("--loraplus-ratio", cfg.loraplus_ratio == 1 or any(".lora_B" in g for g in groups)))
              if not used]
    if unused:
        log.warning("%s: this run has no such weights to train, so %s no effect", ", ".join(unused),
                    "it has" if len(unused) == 1 else "they have")
    by_lr: dict[tuple, list] = {}
    for p in params:
        by_lr.setdefault(lr_of[id(p)], []).append(p)
    if len({cfg.group_lr(name) for name in groups}) > 1:
        log.info("learning rates: %s", ", ".join(f"{name} {cfg.group_lr(name):g}" for name in groups))
    for name, steps in stops.items():
        log.info("%s learns for the first %d steps, then stays as it is (learning rate 0)", name, steps)
    return [{"params": ps, "lr": lr, **({"steps": steps} if steps else {})} for (lr, steps), ps in by_lr.items()]


def make_optimizer(cfg: TrainConfig, groups: list[dict]):
    """--optimizer over the parameter groups (each with its own lr). Prodigy takes its README's settings
    for diffusion models (bias correction, safeguarded warm-up); schedule-free AdamW does the warm-up."""
    name, wd = cfg.optimizer, cfg.weight_decay
    if name in OPTIMIZER_PACKAGES:  # also here: train() can be called without a plan's checks
        check_installed(OPTIMIZER_PACKAGES[name], f"--optimizer {name}", "adapt[optimizers]")
    if name == "prodigy":
        from prodigyopt import Prodigy  # lazy: optional, only for --optimizer prodigy

        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay"
            return Prodigy(groups, lr=cfg.lr, weight_decay=wd, use_bias_correction=True, safeguard_warmup=True)
    if name == "schedule-free-adamw":
        from schedulefree import AdamWScheduleFree  # lazy: optional, only for --optimizer schedule-free-adamw

        return AdamWScheduleFree(groups, lr=cfg.lr, weight_decay=wd, warmup_steps=cfg.warmup_steps)
    if name == "adamw8bit":
        try:
            bnb = optional_import("bitsandbytes")  # optional, only for --optimizer adamw8bit (the CLI defers it)

            return bnb.optim.AdamW8bit(groups, lr=cfg.lr, weight_decay=wd)
        except Exception as e:  # ImportError, or a bitsandbytes build without this device's kernels
            raise AdaptError(f"--optimizer adamw8bit needs a working bitsandbytes ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                             "install a build for your GPU or use --optimizer adamw") from None
    kernel = {"torch": {}, "for": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[adamw_kernel(cfg, groups)]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=wd, **kernel)


def adamw_kernel(cfg: TrainConfig, groups: list[dict]) -> str:
    """auto: the fused kernel where torch has one for every trainable weight (floating point, on CPU or CUDA), else
    "torch": torch's own default for the device. benchmarks/compare.py measured fused at 0.69x the step of torch's
    default for SD 1.5 DreamBooth (256 px, bf16, CPU), 0.61x on the bundled base, no change for LoRA. Not with fp16's
    loss scaling: accelerate does not see a fused step that the scaler skipped, and would advance the LR schedule
    (huggingface/accelerate#4242)."""
    if cfg.adamw_kernel != "auto":
        return cfg.adamw_kernel
    params = [p for g in groups for p in g["params"]]
    if cfg.mixed_precision != "fp16" and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        return "fused"
    return "torch"


def fused_backward(cfg: TrainConfig, n_train: int, n_proc: int) -> bool:
    """Whether this run steps each weight inside backward (StepInBackward; the choice: estimate.choose_fused_backward), logged."""
    on, why = choose_fused_backward(cfg, n_train, n_proc)
    if why:
        log.info("fused backward: %s (%s)", "on" if on else "off", why)
    return on


class StepInBackward(torch.optim.Optimizer):
    """The optimizer step fused into backward (OneTrainer's "fused back pass", kohya's --fused_backward_pass): one
    optimizer per weight, stepped by a hook as soon as backward has accumulated the weight's gradient, which is then
    freed. So a full fine-tune never holds all gradients at once (SD 1.5: 3.2 GiB fewer). Gradient clipping is per
    weight tensor (the global norm is only known after backward). The LR schedule steps this optimizer's groups;
    each hook takes its group's current lr. `armed` False (an earlier chunk of a step, train.train_step) lets the
    gradients accumulate; `step()` steps any weight whose gradient is still there. Its state_dict is the layout of
    one optimizer over all weights (torch's AdamW: checkpoints of either kind resume in the other)."""

    def __init__(self, groups: list[dict], make: Callable[[list[dict]], torch.optim.Optimizer], max_norm: float):
        super().__init__(groups, {})
        self.weights = [(p, g) for g in self.param_groups for p in g["params"]]
        self.inner = [make([{**{k: v for k, v in g.items() if k != "params"}, "params": [p]}]) for p, g in self.weights]
        self.index = {id(p): i for i, (p, _) in enumerate(self.weights)}
        self.max_norm, self.armed = max_norm, True
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p, _ in self.weights]

    def _hook(self, p) -> None:
        if self.armed:
            self._step_one(self.index[id(p)])

    @torch.no_grad()
    def _step_one(self, i: int) -> None:
        p, group = self.weights[i]
        inner = self.inner[i]
        inner.param_groups[0]["lr"] = group["lr"]
        if self.max_norm > 0:
            torch.nn.utils.clip_grad_norm_([p], self.max_norm)
        inner.step()
        p.grad = None

    def step(self, closure=None):
        """What backward did not step already (an unarmed backward's gradients)."""
        for i, (p, _) in enumerate(self.weights):
            if p.grad is not None:
                self._step_one(i)

    def state_dict(self) -> dict:
        """One optimizer's layout: each group with its inner optimizers' settings (betas, eps, ...), states by index."""
        out = super().state_dict()
        inner = [o.state_dict() for o in self.inner]
        out["param_groups"] = [{**{k: v for k, v in inner[g["params"][0]]["param_groups"][0].items() if k != "params"}, **g}
                               for g in out["param_groups"]]
        out["state"] = {i: o["state"][0] for i, o in enumerate(inner) if o["state"]}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict({**state_dict, "state": {}})
        for i, inner in enumerate(self.inner):
            saved = state_dict["state"].get(i)
            inner.load_state_dict({"state": {0: saved} if saved else {}, "param_groups": inner.state_dict()["param_groups"]})

    def close(self) -> None:
        """Remove the hooks: the weights stay trainable for whatever comes next without stepping by themselves."""
        for h in self.handles:
            h.remove()
        self.handles = []


def unwrapped(optimizer):
    """The optimizer inside accelerate's wrapper (the optimizer itself before `prepare`)."""
    return getattr(optimizer, "optimizer", optimizer)


def armed(optimizer, on: bool) -> None:
    """Whether the next backward steps the weights (StepInBackward; other optimizers: nothing to do)."""
    if steps_in_backward(optimizer):
        unwrapped(optimizer).armed = on


def steps_in_backward(optimizer) -> bool:
    return isinstance(unwrapped(optimizer), StepInBackward)


def release(optimizer) -> None:
    """After a run: StepInBackward's hooks removed (other optimizers hold none)."""
    if steps_in_backward(optimizer):
        unwrapped(optimizer).close()
