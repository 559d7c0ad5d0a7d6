"""Codebook health: the fraction of codes in use and the perplexity of the code distribution.

A VQ-GAN whose codebook collapses to a few codes still reconstructs blurry volumes, so both numbers are
logged in training and evaluation. Perplexity = exp(entropy of the code histogram): 1 when one code is
used, ``num_embeddings`` when all codes are equally frequent. MONAI's VectorQuantizer keeps a per-batch
perplexity only; this accumulates over a whole epoch / set of volumes (own code: MONAI has no metric).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce


def code_histogram(indices: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """Counts of each code index (float64, length ``num_embeddings``)."""
    flat = indices.detach().reshape(-1).long().cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_embeddings):
        raise ValueError(f"code indices outside [0, {num_embeddings})")
    return torch.bincount(flat, minlength=num_embeddings).double()


def usage_from_histogram(counts: torch.Tensor) -> float:
    """Fraction of codes used at least once."""
    return float((counts > 0).sum()) / counts.numel()


def perplexity_from_histogram(counts: torch.Tensor) -> float:
    """exp(entropy) of the normalised histogram (0 when nothing was counted)."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def codebook_stats(indices: torch.Tensor, num_embeddings: int) -> dict[str, float]:
    """``{"codebook_usage": ..., "perplexity": ...}`` for a tensor of code indices."""
    counts = code_histogram(indices, num_embeddings)
    return {"codebook_usage": usage_from_histogram(counts), "perplexity": perplexity_from_histogram(counts)}


class CodebookMetric(Metric):
    """Ignite metric accumulating the code histogram; ``statistic`` is ``"usage"`` or ``"perplexity"``.

    ``output_transform`` must return the tensor of code indices of the iteration.
    """

    def __init__(
        self,
        num_embeddings: int,
        statistic: str = "usage",
        output_transform: Callable = lambda x: x["indices"],
        device: str | torch.device = "cpu",
    ):
        if statistic not in ("usage", "perplexity"):
            raise ValueError(f"statistic must be 'usage' or 'perplexity', got {statistic!r}")
        self.num_embeddings = int(num_embeddings)
        self.statistic = statistic
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._counts = torch.zeros(self.num_embeddings, dtype=torch.float64, device=self._device)

    @reinit__is_reduced
    def update(self, output: torch.Tensor) -> None:
        self._counts += code_histogram(output, self.num_embeddings).to(self._device)

    @sync_all_reduce("_counts")
    def compute(self) -> float:
        if self.statistic == "usage":
            return usage_from_histogram(self._counts)
        return perplexity_from_histogram(self._counts)


@torch.no_grad()
def restart_dead_codes(
    quantizer: torch.nn.Module, latents: torch.Tensor, min_cluster_size: float = 1.0
) -> int:
    """Move codes whose EMA cluster size fell below ``min_cluster_size`` onto random encoder outputs.

    MONAI's EMAQuantizer starts from N(0, 1) codes that are far from the encoder's outputs, so few codes
    ever win and the rest never move (codebook collapse). Restarting dead codes on current latents (as in
    Jukebox / SoundStream) keeps the codebook in use; own code, MONAI has none. ``quantizer`` is the
    ``EMAQuantizer`` (``vqvae.quantizer.quantizer``), ``latents`` the encoder output (B, D, ...).
    Returns the number of codes restarted (identical on every DDP rank: rank 0's choice is broadcast).
    """
    dead = quantizer.ema_cluster_size < min_cluster_size
    n = int(dead.sum())
    if n:
        flat = latents.detach().movedim(1, -1).reshape(-1, latents.shape[1]).float()
        picks = flat[torch.randint(flat.shape[0], (n,), device=flat.device)]
        picks = picks.to(quantizer.embedding.weight.device)
        quantizer.embedding.weight.data[dead] = picks
        # restarted with exactly the threshold mass: a code used fewer than ``min_cluster_size`` times per step
        # (EMA) since its restart falls below it again and is restarted at the next call
        mass = max(float(min_cluster_size), 1e-3)
        quantizer.ema_w.data[dead] = picks * mass
        quantizer.ema_cluster_size.data[dead] = mass
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for tensor in (
            quantizer.embedding.weight.data,
            quantizer.ema_w.data,
            quantizer.ema_cluster_size.data,
        ):
            torch.distributed.broadcast(tensor, src=0)
    return n
