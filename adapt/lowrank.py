"""Low-rank approximation of weight updates by truncated SVD: what `adapt extract` (a fine-tuned
model minus its base) and `adapt resize` (a LoRA to a lower rank) share.

A module's update dW (a Linear's [out, in], a convolution's [out, in, kh, kw] flattened to
[out, in*kh*kw]) has singular values s_1 >= s_2 >= ...; keeping the top k gives the best rank-k
approximation in the Frobenius norm (Eckart-Young), with ||dW - dW_k||^2 = sum_{i>k} s_i^2. Errors
are relative: ||dW - dW_k|| / ||dW||, and over several modules sqrt(sum of the squared errors /
sum of the squared norms). "Energy" is the kept fraction of sum(s^2), so a module kept at energy
f has relative error sqrt(1 - f).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import AdaptError
from .loras import Lora


@dataclass
class Spectrum:
    """One module's update as U diag(s) Vh (s descending), and the module's weight shape."""

    u: torch.Tensor  # [out, n]
    s: torch.Tensor  # [n], float64
    vh: torch.Tensor  # [n, in*kh*kw]
    shape: tuple

    @property
    def energy(self) -> float:
        return float((self.s ** 2).sum())

    def tail(self, k: int) -> float:
        """||dW - dW_k||^2: the energy a rank-k approximation leaves out."""
        return float((self.s[k:] ** 2).sum())

    def lora(self, k: int) -> Lora:
        """The rank-k approximation as a LoRA module (up = U_k diag(s_k), down = Vh_k, alpha = k: scale 1)."""
        k = max(1, min(k, self.u.shape[1]))
        up = (self.u[:, :k] * self.s[:k].to(self.u.dtype)).float()
        down = self.vh[:k].float()
        if len(self.shape) == 4:
            down, up = down.reshape(k, *self.shape[1:]), up.reshape(self.shape[0], k, 1, 1)
        return Lora(down.contiguous(), up.contiguous(), float(k))


def dense_spectrum(delta: torch.Tensor, keep: int) -> Spectrum:
    """SVD of a dense update (fp32; extract's W_tuned - W_base), all singular values but only the
    top `keep` singular vectors (what a LoRA of rank <= keep needs)."""
    u, s, vh = torch.linalg.svd(delta.flatten(1).float(), full_matrices=False)
    return Spectrum(u[:, :keep].clone(), s.double(), vh[:keep].clone(), tuple(delta.shape))


def lora_spectrum(lo: Lora) -> Spectrum:
    """SVD of a LoRA module's update scale * up @ down without forming it: QR of both factors, then
    the SVD of the small [r, r] core (float64)."""
    up, down = lo.up.flatten(1).double() * lo.scale, lo.down.flatten(1).double()
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    return Spectrum(qu @ u, s, vh @ qd.T, (lo.up.shape[0], *lo.down.shape[1:]))


def energy_rank(s: torch.Tensor, fraction: float) -> int:
    """The smallest k whose top-k singular values hold `fraction` of sum(s^2) (1.0: the numerical
    rank, leaving out what is below 1e-12 of the energy)."""
    e = (s.double() ** 2).cumsum(0)
    if e.numel() == 0 or e[-1] <= 0:
        return 1
    need = min(fraction, 1 - 1e-12) * e[-1]
    return int((e < need).sum()) + 1


def pick_rank(sp: Spectrum, rank: int | None, energy: float | None) -> int:
    """Per module: --rank R, or the --energy rank (capped by --rank when both), never above the module's rank."""
    k = energy_rank(sp.s, energy) if energy is not None else rank
    return max(1, min(k, rank or k, sp.s.shape[0]))


def relative_error(spectra: dict[str, Spectrum], ranks: dict[str, int]) -> float:
    """sqrt(sum of left-out energy / sum of energy) over the modules."""
    total = sum(sp.energy for sp in spectra.values())
    return math.sqrt(sum(sp.tail(ranks[k]) for k, sp in spectra.items()) / total) if total > 0 else 0.0


def rank_table(spectra: dict[str, Spectrum], chosen: int) -> list[str]:
    """Lines: the overall relative error and energy kept at ranks 1, 2, 4, ... up to 4x `chosen`
    (and at `chosen`, marked *) for every module at that rank (or its own, when smaller)."""
    top = max(sp.s.shape[0] for sp in spectra.values())
    ranks = sorted({*(2 ** i for i in range(12) if 2 ** i <= min(4 * chosen, top)), min(chosen, top)})
    lines = ["rank  relative error  energy kept"]
    for r in ranks:
        err = relative_error(spectra, {k: r for k in spectra})
        lines.append(f"{r:>4}{'*' if r == min(chosen, top) else ' '} {err:>14.6f}  {1 - err ** 2:>11.6f}")
    return lines


def worst_modules(spectra: dict[str, Spectrum], ranks: dict[str, int], n: int = 5) -> list[str]:
    """Lines: the `n` modules with the largest relative error at their rank."""
    errs = {k: math.sqrt(sp.tail(ranks[k]) / sp.energy) if sp.energy > 0 else 0.0 for k, sp in spectra.items()}
    worst = sorted(errs, key=lambda k: -errs[k])[:n]
    return [f"  {errs[k]:.6f}  rank {ranks[k]:>3} of {spectra[k].s.shape[0]:>4}  {k}" for k in worst]


def reduce_rank(loras: dict[str, Lora], rank: int) -> tuple[dict[str, Lora], float]:
    """Best rank-`rank` approximation of each module's update (`merge --rank`: the exact sum's ranks
    add up), each module at most its own rank; returns the LoRA and the relative error over all
    modules together."""
    if rank < 1:
        raise AdaptError(f"--rank must be >= 1, got {rank}")
    spectra = {k: lora_spectrum(lo) for k, lo in loras.items()}
    ranks = {k: min(rank, sp.s.shape[0]) for k, sp in spectra.items()}
    return {k: sp.lora(ranks[k]) for k, sp in spectra.items()}, relative_error(spectra, ranks)
