"""What every reward model here shares: bootstrap heads, their ensemble output, and how they are fit."""

from __future__ import annotations

from typing import Callable

import math

import numpy as np
import torch

from reflexd.config import TrainerConfig

from . import Progress


def ensemble(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (the heads' mean) and spread (their population std) from [..., K] head outputs."""
    scores = out.mean(dim=-1)
    # the std written out, so the exported graph is plain ONNX ops on every exporter
    spread = torch.sqrt(((out - scores.unsqueeze(-1)) ** 2).mean(dim=-1))
    return scores, spread


def fit_heads(
    model: torch.nn.Module,
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    context: torch.Tensor,
    chosen: torch.Tensor,
    reward: np.ndarray,
    optimizer: torch.optim.Optimizer,
    settings: TrainerConfig,
    gen: torch.Generator,
    progress: Progress | None,
) -> torch.nn.Module:
    """Fit ``model.heads`` (a Linear to K outputs) on the chosen actions' rewards.

    ``predict(context, chosen)`` gives [b, K]. Each head sees its own Poisson(1) bootstrap
    weights, fixed per example for the run, so their spread estimates the model's uncertainty.
    """
    n = len(reward)
    # rewards come in any unit; training on standardised targets keeps one learning rate
    # sensible for all of them, and the affine map is folded back into the heads at the end
    offset = float(reward.mean())
    scale = float(reward.std()) or 1.0
    target = torch.from_numpy(((reward - offset) / scale).astype(np.float32)).unsqueeze(1)
    weights = torch.poisson(torch.ones(n, model.heads.out_features), generator=gen)
    model.train()
    epochs = max(settings.epochs, math.ceil(settings.min_steps / math.ceil(n / settings.batch_size)))
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, settings.batch_size):
            idx = order[start : start + settings.batch_size]
            pred = predict(context[idx], chosen[idx])
            # dividing by the expected weight (1 per example and head), not the drawn sum,
            # keeps a head whose weights in this minibatch happen to be all zero well defined
            loss = (weights[idx] * (pred - target[idx]) ** 2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * idx.shape[0]
        if progress is not None:
            progress(epoch, epochs, total / n * scale * scale)
    with torch.no_grad():
        model.heads.weight.mul_(scale)
        model.heads.bias.mul_(scale).add_(offset)
    return model.eval()
