"""A small transformer reward model: the context and each action as tokens.

The hashed context vector [B, Dc] becomes one token and each action's hashed vector [B, A, Da]
one token more (separate linear projections to ``d_model``, plus a learned type embedding). A
few pre-norm encoder layers (multi-head attention, then a feed-forward block, each residual)
mix them, and ``ensemble`` bootstrap heads read every action token: their mean is the action's
score and their spread its uncertainty, exactly as in the MLP, so exploration and the gate treat
both learners alike. Per-action features and any number of actions come with the token view.

Attention pattern (the choice that matters for padding): each action token attends to the
context token and to itself, never to the other actions; the context token attends to itself.
So an action's score depends only on the context and that action, which gives three things:

- padded action rows (zero vectors in ``dataset.Batch``) cannot influence a real action's score,
  without a mask input the ONNX contract does not have, and without guessing padding from
  all-zero vectors (a hashed real action can in principle cancel to zero);
- training on the chosen action alone (the only one with a reward) is exact: the model is run
  on [B, 1, Da] and gives the same score as inside the full set;
- the attention is a softmax over two keys per query, written with plain matmul-free ops
  (elementwise products, sum, softmax over a stacked axis) that export cleanly with the dynamo
  exporter and match onnxruntime to ~1e-7. ``torch.nn.TransformerEncoder`` is not used: its
  inference fast path (``_transformer_encoder_layer_fwd``) runs a different kernel from the
  exported graph, and a full A×A attention would let padding leak in without a mask.

What this gives up is actions comparing themselves with each other (a "cheapest of the set"
effect); a reward model scored per action, as the gate and exploration assume, does not need it.
The settings are ``trainer.transformer_dim``, ``transformer_layers`` and ``transformer_heads``;
``learning_rate``, ``epochs``, ``batch_size`` and ``ensemble`` are shared with the MLP.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from reflexd.config import TrainerConfig
from reflexd.errors import TrainingError
from reflexd.extensions import Progress
from reflexd.learning.dataset import Batch

from ._heads import Adam, RewardModel, fit_heads


class _Layer(nn.Module):
    """One pre-norm encoder layer over a context token [B, d] and action tokens [B, A, d]."""

    def __init__(self, d_model: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = d_model // heads
        self.norm1 = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, ff), nn.GELU(approximate="tanh"), nn.Linear(ff, d_model))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim))

    def forward(self, ctx: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.norm1(ctx)  # [B, d]
        a = self.norm1(act)  # [B, A, d]
        q = self._split(self.q(a))  # [B, A, H, h]
        k_self = self._split(self.k(a))  # [B, A, H, h]
        v_self = self._split(self.v(a))
        k_ctx = self._split(self.k(c)).unsqueeze(1)  # [B, 1, H, h]
        v_ctx = self._split(self.v(c)).unsqueeze(1)
        scale = 1.0 / math.sqrt(self.head_dim)
        # each action query has exactly two keys: the context token and itself
        logits = torch.stack(((q * k_ctx).sum(-1) * scale, (q * k_self).sum(-1) * scale), dim=-1)  # [B, A, H, 2]
        w = torch.softmax(logits, dim=-1).unsqueeze(-1)  # [B, A, H, 2, 1]
        mixed = w[..., 0, :] * v_ctx + w[..., 1, :] * v_self  # [B, A, H, h]
        act = act + self.out(mixed.flatten(-2))
        # the context token attends only to itself: softmax over one key is 1, so it gets its value
        ctx = ctx + self.out(self.v(c))
        act = act + self.ff(self.norm2(act))
        ctx = ctx + self.ff(self.norm2(ctx))
        return ctx, act


class RewardTransformer(RewardModel):
    def __init__(
        self, context_dim: int, action_dim: int, d_model: int, layers: int, heads: int, ensemble: int
    ) -> None:
        super().__init__()
        self.context_embed = nn.Linear(context_dim, d_model)
        self.action_embed = nn.Linear(action_dim, d_model)
        # which kind of token this is; the projections' biases would do, but this keeps them apart
        self.context_type = nn.Parameter(torch.zeros(d_model))
        self.action_type = nn.Parameter(torch.zeros(d_model))
        self.layers = nn.ModuleList(_Layer(d_model, heads, 2 * d_model) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.heads = nn.Linear(d_model, ensemble)

    def head_outputs(self, context: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Every head's prediction, [B, A, K], for context [B, Dc] and actions [B, A, Da]."""
        ctx = self.context_embed(context) + self.context_type
        act = self.action_embed(actions) + self.action_type
        for layer in self.layers:
            ctx, act = layer(ctx, act)
        return self.heads(self.norm(act))


class TransformerLearner:
    name = "transformer"

    def fit(
        self, train: Batch, settings: TrainerConfig, seed: int, progress: Progress | None = None
    ) -> RewardTransformer:
        d_model, heads = settings.transformer_dim, settings.transformer_heads
        if d_model % heads:
            raise TrainingError(
                f"trainer.transformer_dim ({d_model}) must be a multiple of trainer.transformer_heads ({heads})"
            )
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        k = settings.ensemble
        model = RewardTransformer(
            train.context.shape[1], train.action_sets.shape[2], d_model, settings.transformer_layers, heads, k
        )

        context = torch.from_numpy(train.context)
        # only the chosen action has a reward; as actions never attend to each other, scoring it
        # alone ([n, 1, Da]) gives exactly the score it has inside its full (padded) set
        chosen = torch.from_numpy(train.chosen_actions).unsqueeze(1)
        optimizer = Adam(model.parameters(), settings.learning_rate, weight_decay=1e-4, decoupled=True)

        def predict(ctx: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
            return model.head_outputs(ctx, act)[:, 0, :]  # [b, K]

        return fit_heads(model, predict, context, chosen, train.reward, optimizer, settings, gen, progress)
