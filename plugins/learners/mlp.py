"""The default reward model: a one-hidden-layer MLP over [context; action] with bootstrap heads.

The first layer is split into a context part and an action part so the context term is computed
once per decision and broadcast over its actions; that is exactly a Linear over the concatenation,
without materialising it. The K heads share the hidden layer and each is trained on its own
Poisson(1) bootstrap resample of the data, so their disagreement (``spread``) is a cheap
uncertainty estimate that UCB exploration and the gate can use. Beside the hidden layer each
head has its own bilinear term x^T W_k a, so its size and scoring cost grow with the heads.
"""

from __future__ import annotations

import torch
from torch import nn

from reflexd.config import TrainerConfig
from reflexd.extensions import Progress
from reflexd.learning.dataset import Batch

from ._heads import Adam, RewardModel, fit_heads


class RewardMLP(RewardModel):
    def __init__(self, context_dim: int, action_dim: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.context_layer = nn.Linear(context_dim, hidden)
        # the bias lives in the context layer; a second one here would be redundant
        self.action_layer = nn.Linear(action_dim, hidden, bias=False)
        # beside the hidden layer, each head's bilinear form x^T W_k a, like Vowpal Wabbit's -q sa:
        # a per-action linear model, learnable from the few dozen examples per action the ReLU
        # layer cannot yet use. It starts at zero, so early on it adds nothing the data did not
        # put there. Stored as one Linear(context, heads × action): one matmul per decision.
        self.bilinear = nn.Linear(context_dim, heads * action_dim, bias=False)
        nn.init.zeros_(self.bilinear.weight)
        # K heads of Linear(hidden, 1) stacked as one Linear(hidden, K): one matmul instead of K
        self.heads = nn.Linear(hidden, heads)

    def bilinear_term(self, context: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Every head's x^T W_k a: [B, A, K] for actions [B, A, Da], or [B, K] for actions [B, Da]."""
        shape = (self.heads.out_features, self.action_layer.in_features)
        weights = self.bilinear(context).unflatten(-1, shape)  # [B, K, Da]
        if actions.dim() == 3:
            return actions @ weights.transpose(1, 2)
        return (weights @ actions.unsqueeze(-1)).squeeze(-1)

    def head_outputs(self, context: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Every head's prediction: [B, A, K] for actions [B, A, Da], or [B, K] for actions [B, Da]."""
        ctx = self.context_layer(context)
        if actions.dim() == 3:
            ctx = ctx.unsqueeze(1)
        return self.heads(torch.relu(ctx + self.action_layer(actions))) + self.bilinear_term(context, actions)


class MLPLearner:
    name = "mlp"

    def fit(
        self, train: Batch, settings: TrainerConfig, seed: int, progress: Progress | None = None
    ) -> RewardMLP:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        heads = settings.ensemble
        model = RewardMLP(train.context.shape[1], train.action_sets.shape[2], settings.hidden_size, heads)

        context = torch.from_numpy(train.context)
        # only the chosen action has a reward, so padding never reaches the loss
        chosen = torch.from_numpy(train.chosen_actions)
        optimizer = Adam(model.parameters(), settings.learning_rate)
        return fit_heads(
            model, model.head_outputs, context, chosen, train.reward, optimizer, settings, gen, progress,
            scaled=(model.bilinear,),
        )
