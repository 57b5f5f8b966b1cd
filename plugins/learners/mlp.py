"""The default reward model: a one-hidden-layer MLP over [context; action] with bootstrap heads.

The first layer is split into a context part and an action part so the context term is computed
once per decision and broadcast over its actions; that is exactly a Linear over the concatenation,
without materialising it. The K heads share the hidden layer and each is trained on its own
Poisson(1) bootstrap resample of the data, so their disagreement (``spread``) is a cheap
uncertainty estimate that UCB exploration and the gate can use.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from reflexd.config import TrainerConfig
from reflexd.dataset import Batch

from . import Progress


class RewardMLP(nn.Module):
    def __init__(self, context_dim: int, action_dim: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.context_layer = nn.Linear(context_dim, hidden)
        # the bias lives in the context layer; a second one here would be redundant
        self.action_layer = nn.Linear(action_dim, hidden, bias=False)
        # K heads of Linear(hidden, 1) stacked as one Linear(hidden, K): one matmul instead of K
        self.heads = nn.Linear(hidden, heads)

    def head_outputs(self, context: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Every head's prediction: [B, A, K] for actions [B, A, Da], or [B, K] for actions [B, Da]."""
        ctx = self.context_layer(context)
        if actions.dim() == 3:
            ctx = ctx.unsqueeze(1)
        return self.heads(torch.relu(ctx + self.action_layer(actions)))

    def forward(self, context: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head_outputs(context, actions)
        scores = out.mean(dim=-1)
        # population std written out, so the exported graph is plain ONNX ops on every exporter
        spread = torch.sqrt(((out - scores.unsqueeze(-1)) ** 2).mean(dim=-1))
        return scores, spread


class MLPLearner:
    name = "mlp"

    def fit(
        self, train: Batch, settings: TrainerConfig, seed: int, progress: Progress | None = None
    ) -> RewardMLP:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        n = len(train)
        heads = settings.ensemble
        model = RewardMLP(train.context.shape[1], train.actions.shape[2], settings.hidden_size, heads)

        context = torch.from_numpy(train.context)
        # only the chosen action has a reward, so padding never reaches the loss
        chosen = torch.from_numpy(train.actions[np.arange(n), train.chosen])
        # rewards come in any unit; training on standardised targets keeps one learning rate
        # sensible for all of them, and the affine map is folded back into the heads at the end
        offset = float(train.reward.mean())
        scale = float(train.reward.std()) or 1.0
        target = torch.from_numpy(((train.reward - offset) / scale).astype(np.float32)).unsqueeze(1)
        weights = torch.poisson(torch.ones(n, heads), generator=gen)

        optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
        batch_size = settings.batch_size
        for epoch in range(1, settings.epochs + 1):
            order = torch.randperm(n, generator=gen)
            total = 0.0
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                pred = model.head_outputs(context[idx], chosen[idx])
                # dividing by the expected weight (1 per example and head), not the drawn sum,
                # keeps a head whose weights in this minibatch happen to be all zero well defined
                loss = (weights[idx] * (pred - target[idx]) ** 2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * idx.shape[0]
            if progress is not None:
                progress(epoch, settings.epochs, total / n * scale * scale)

        with torch.no_grad():
            model.heads.weight.mul_(scale)
            model.heads.bias.mul_(scale).add_(offset)
        return model.eval()
