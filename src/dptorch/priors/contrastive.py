"""Contrastive pretraining on synthetic images: a data-independent initialisation for DP-SGD.

``pretrain_on_dead_leaves(encoder)`` trains ``encoder`` (with a throw-away projection head)
so that two random views of the same dead-leaves image map close together and views of
different images apart (the NT-Xent loss of SimCLR, Chen et al., arXiv 2002.05709), on a pool
of images drawn by :func:`dptorch.priors.dead_leaves`. The encoder is then the starting point
of ordinary private training, every weight of it trained further by DP-SGD (Tang et al.'s
DP-RandP, arXiv 2306.06076, "training from scratch" in the sense that no real data is used
before the private run).

Privacy: nothing here reads data. The learned weights are a function of the encoder's
initial weights and ``generator`` alone, so starting DP-SGD from them is like starting from
any other random initialisation: the privacy guarantee of the private run is unchanged and
nothing needs to be accounted. (A prior learned on *real* public images would be no different
for privacy, but its data would have to be truly public; here there is none at all.)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dptorch.errors import DPTypeError, DPValueError
from dptorch.priors.synthetic import dead_leaves, random_views
from dptorch.validation import check_int, check_number, check_positive_number

__all__ = ["PretrainReport", "nt_xent_loss", "pretrain_on_dead_leaves"]


def nt_xent_loss(first: Tensor, second: Tensor, temperature: float = 0.2) -> Tensor:
    """SimCLR's loss for ``N`` pairs of embeddings ``[N, D]``: row ``i`` of ``first`` must pick
    row ``i`` of ``second`` (and vice versa) among the other ``2N - 1`` rows, by cosine
    similarity divided by ``temperature``."""
    if first.shape != second.shape or first.dim() != 2:
        raise DPValueError(
            f"nt_xent_loss wants two [N, D] embeddings of one shape, got {tuple(first.shape)} "
            f"and {tuple(second.shape)}."
        )
    pairs = first.shape[0]
    both = F.normalize(torch.cat([first, second]), dim=1)  # [2N, D]
    logits = both @ both.T / temperature
    # Never one's own row: mask the diagonal out of the softmax.
    logits = logits.masked_fill(torch.eye(2 * pairs, dtype=torch.bool, device=logits.device), -1e9)
    partner = torch.cat([torch.arange(pairs, 2 * pairs), torch.arange(pairs)]).to(logits.device)
    return F.cross_entropy(logits, partner)


@dataclass(frozen=True)
class PretrainReport:
    """What :func:`pretrain_on_dead_leaves` did: the loss of its first step (``log(2N - 1)``
    is chance level), the mean loss of its last tenth of steps, and the seconds it took."""

    steps: int
    first_loss: float
    final_loss: float
    seconds: float


def pretrain_on_dead_leaves(
    encoder: nn.Module,
    *,
    embedding_dim: int,
    steps: int = 1500,
    batch_size: int = 256,
    pool_size: int = 16384,
    image_size: int = 28,
    channels: int = 1,
    lr: float = 0.05,
    temperature: float = 0.2,
    normalize: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> PretrainReport:
    """Train ``encoder`` in place by contrastive learning on dead-leaves images.

    Args:
        encoder: maps ``[N, channels, image_size, image_size]`` images to ``[N,
            embedding_dim]`` features (e.g. a CNN's layers up to its flatten).
        embedding_dim: the encoder's output width; a projection head ``Linear, ReLU, Linear``
            (to 64) on top of it is trained alongside and discarded.
        steps: SGD steps (momentum 0.9, cosine learning-rate decay, weight decay 1e-4).
        batch_size: images per step (2 views each).
        pool_size: dead-leaves images drawn once and sampled from at every step, each step
            seeing fresh random views.
        normalize: ``(mean, std)`` applied to the views, the same the private data gets, so
            the encoder's first layer sees inputs on the scale it will be trained on.
        generator: the source of every random draw (images, views, batches, the head's
            initialisation); the encoder's own initialisation is the caller's.

    Privacy: reads no data (see the module docstring); the result is data-independent.
    """
    if not isinstance(encoder, nn.Module):
        raise DPTypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}.")
    embedding_dim = check_int("embedding_dim", embedding_dim, 1)
    steps = check_int("steps", steps, 1)
    batch_size = check_int("batch_size", batch_size, 2)
    pool_size = check_int("pool_size", pool_size, 1)
    lr = check_positive_number("lr", lr)
    temperature = check_positive_number("temperature", temperature)
    if not isinstance(normalize, tuple | list) or len(normalize) != 2:
        raise DPTypeError(f"normalize={normalize!r} must be a pair (mean, std).")
    mean = check_number("normalize mean", normalize[0])
    std = check_positive_number("normalize std", normalize[1])
    device = next(encoder.parameters(), torch.empty(0)).device
    _check_embedding_width(encoder, (channels, image_size), embedding_dim, device)
    started = time.perf_counter()
    pool = torch.cat(
        [
            dead_leaves(
                min(512, pool_size - start), size=image_size, channels=channels, generator=generator
            )
            for start in range(0, pool_size, 512)
        ]
    )
    layers = [nn.Linear(embedding_dim, 256), nn.Linear(256, 64)]
    with torch.no_grad():  # the head's initialisation from the generator too
        for layer in layers:
            bound = 1.0 / math.sqrt(layer.in_features)
            for tensor in (layer.weight, layer.bias):
                tensor.copy_((torch.rand(tensor.shape, generator=generator) * 2 - 1) * bound)
    head = nn.Sequential(layers[0], nn.ReLU(), layers[1])
    head.to(device)
    parameters = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    was_training = encoder.training
    encoder.train()
    losses: list[float] = []
    final_steps = max(1, steps // 10)
    for step in range(steps):
        images = pool[torch.randint(len(pool), (batch_size,), generator=generator)]
        # Drawn on the CPU (where ``generator`` lives), trained where the encoder is.
        first = ((random_views(images, generator=generator) - mean) / std).to(device)
        second = ((random_views(images, generator=generator) - mean) / std).to(device)
        loss = nt_xent_loss(head(encoder(first)), head(encoder(second)), temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step == 0 or step >= steps - final_steps:
            losses.append(float(loss.detach()))
    encoder.train(was_training)
    final = sum(losses[-final_steps:]) / final_steps
    return PretrainReport(steps, losses[0], final, time.perf_counter() - started)


def _check_embedding_width(
    encoder: nn.Module, image: tuple[int, int], embedding_dim: int, device: torch.device
) -> None:
    """Refuse before any work if the encoder's output is not ``[N, embedding_dim]``."""
    channels, size = image
    probe = torch.zeros(2, channels, size, size, device=device)
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            out = encoder(probe)
    finally:
        encoder.train(was_training)
    if out.dim() != 2 or out.shape[1] != embedding_dim:
        raise DPValueError(
            f"embedding_dim={embedding_dim} but the encoder maps {tuple(probe.shape)} images "
            f"to {tuple(out.shape)}; pass embedding_dim={out[0].numel()} (flatten the "
            "encoder's output to [N, features] if it is not)."
        )
