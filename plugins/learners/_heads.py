"""What every reward model here shares: bootstrap heads, their ensemble output, and how they are fit."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.optim.adam import adam

from reflexd.config import TrainerConfig
from reflexd.extensions import Progress


def ensemble(out: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (the heads' mean, clamped to [low, high]) and spread (their population std) from
    [..., K] head outputs."""
    scores = out.mean(dim=-1)
    # the std written out, so the exported graph is plain ONNX ops on every exporter
    spread = torch.sqrt(((out - scores.unsqueeze(-1)) ** 2).mean(dim=-1))
    return scores.clamp(low, high), spread


class RewardModel(nn.Module):
    """A reward model with bootstrap heads: ``head_outputs`` gives every head's prediction, and
    the model scores an action by their mean, within the rewards it was fit on.

    The clamp is what keeps exploration alive where the model knows least. A regression
    extrapolates: an action never tried in some region of contexts, and bad everywhere it was
    tried, is predicted well below the lowest reward there is, and SquareCB then gives it so
    little probability that it is never tried there, so the model is never corrected. Clamped,
    such an action ties with the other bad ones and is explored like them. Actions extrapolated
    above the highest reward tie likewise, and the first of them counts as the best. (Vowpal
    Wabbit clamps its predictions to the labels it has seen likewise.)
    """

    def __init__(self) -> None:
        super().__init__()
        # set by fit_heads; unbounded until then
        self.register_buffer("reward_low", torch.tensor(-math.inf))
        self.register_buffer("reward_high", torch.tensor(math.inf))
        self.reward_low: torch.Tensor
        self.reward_high: torch.Tensor

    def head_outputs(self, context: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Every head's prediction, [B, A, K], for context [B, Dc] and actions [B, A, Da]."""
        raise NotImplementedError

    def forward(self, context: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ensemble(self.head_outputs(context, actions), self.reward_low, self.reward_high)


class Adam:
    """Adam, or AdamW with ``decoupled`` weight decay, on torch's fused CPU kernel.

    The same update as ``torch.optim.Adam(..., fused=True)``, minus its ``step`` wrapper, which
    imports torch's compiler (torch._dynamo, about a second) on the first step only to mark a
    graph break for torch.compile, which training here never uses.
    """

    def __init__(
        self, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0, decoupled: bool = False
    ) -> None:
        self.params = list(params)
        self.lr = lr
        self.weight_decay = weight_decay
        self.decoupled = decoupled
        self.exp_avgs = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
        self.steps = [torch.zeros(()) for _ in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        adam(
            [self.params[i] for i in live],
            [self.params[i].grad for i in live],
            [self.exp_avgs[i] for i in live],
            [self.exp_avg_sqs[i] for i in live],
            [],
            [self.steps[i] for i in live],
            fused=True,
            decoupled_weight_decay=self.decoupled,
            amsgrad=False,
            beta1=0.9,
            beta2=0.999,
            lr=self.lr,
            weight_decay=self.weight_decay,
            eps=1e-8,
            maximize=False,
        )


def fit_heads(
    model: RewardModel,
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    context: torch.Tensor,
    chosen: torch.Tensor,
    reward: np.ndarray,
    optimizer: Adam,
    settings: TrainerConfig,
    gen: torch.Generator,
    progress: Progress | None,
    scaled: Iterable[torch.nn.Linear] = (),
) -> RewardModel:
    """Fit ``model.heads`` (a Linear to K outputs) on the chosen actions' rewards.

    ``predict(context, chosen)`` gives [b, K]. Each head sees its own Poisson(1) bootstrap
    weights, fixed per example for the run, so their spread estimates the model's uncertainty.
    ``scaled`` are Linear layers whose outputs the model adds to the heads' (the MLP's bilinear
    term): they are rescaled to reward units with the heads (the offset goes into the heads'
    bias alone). The model's scores are then bounded by the lowest and highest reward fit.

    Data-parallel when ``torch.distributed`` is initialised with more than one process (``reflexd
    fleet train`` runs it on Ray Train's workers): each process fits on its own shard of the rows,
    and what DistributedDataParallel would do is done here, since the loop calls ``predict``
    rather than the module's forward, which DDP's hooks need: the parameters start as rank 0's,
    the reward statistics (offset, scale, bounds) and the number of steps are the whole data's,
    each step's minibatch is split between the processes (about ``batch_size`` rows in all) and
    the gradients are averaged across them (one all-reduce per step) before every process takes
    the same step. So every process ends with the same model, trained as one process would be on
    all the rows with the same settings, up to the order of the rows.
    """
    group = _data_parallel()
    n = len(reward)
    if group is not None:
        return _fit_heads_parallel(model, predict, context, chosen, reward, optimizer, settings, gen, progress, scaled, *group)
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
        # summed as a tensor: reading it out every step (.item()) costs more than the step's maths
        total = torch.zeros((), dtype=torch.float64)
        for start in range(0, n, settings.batch_size):
            idx = order[start : start + settings.batch_size]
            pred = predict(context[idx], chosen[idx])
            # dividing by the expected weight (1 per example and head), not the drawn sum,
            # keeps a head whose weights in this minibatch happen to be all zero well defined
            loss = (weights[idx] * (pred - target[idx]) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.detach() * idx.shape[0]
        if progress is not None:
            progress(epoch, epochs, total.item() / n * scale * scale)
    _fold(model, scaled, offset, scale, float(reward.min()), float(reward.max()))
    return model.eval()


def _fold(model: RewardModel, scaled: Iterable[torch.nn.Linear], offset: float, scale: float, low: float, high: float) -> None:
    """Fold the standardisation back into the heads (and ``scaled``), and set the reward bounds."""
    with torch.no_grad():
        for layer in scaled:
            layer.weight.mul_(scale)
            if layer.bias is not None:
                layer.bias.mul_(scale)
        model.heads.weight.mul_(scale)
        model.heads.bias.mul_(scale).add_(offset)
        model.reward_low.fill_(low)
        model.reward_high.fill_(high)


def _data_parallel() -> tuple[int, int] | None:
    """(rank, world size) when this process is one of several in a torch.distributed group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return dist.get_rank(), dist.get_world_size()


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s generator, derived from the run's ``seed``: one of its own per
    rank, and within what ``torch.Generator.manual_seed`` takes (a generator's ``initial_seed``
    may be anything up to 2**64 - 1, and a product of it overflows)."""
    return (seed * 1_000_003 + rank) % 2**63


def _fit_heads_parallel(
    model: RewardModel,
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    context: torch.Tensor,
    chosen: torch.Tensor,
    reward: np.ndarray,
    optimizer: Adam,
    settings: TrainerConfig,
    gen: torch.Generator,
    progress: Progress | None,
    scaled: Iterable[torch.nn.Linear],
    rank: int,
    world: int,
) -> RewardModel:
    """``fit_heads`` on this process's shard, in step with the others (see there)."""
    import torch.distributed as dist

    n = len(reward)
    params = list(model.parameters())
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)
    reward64 = reward.astype(np.float64)
    sums = torch.tensor([n, reward64.sum(), (reward64**2).sum()], dtype=torch.float64)
    dist.all_reduce(sums)
    low = torch.tensor(float(reward64.min()) if n else math.inf, dtype=torch.float64)
    high = torch.tensor(float(reward64.max()) if n else -math.inf, dtype=torch.float64)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    total_n = int(sums[0].item())
    if total_n == 0:
        raise ValueError("no rows to fit on any process")
    offset = float(sums[1] / total_n)
    scale = math.sqrt(max(float(sums[2] / total_n) - offset * offset, 0.0)) or 1.0
    target = torch.from_numpy(((reward64 - offset) / scale).astype(np.float32)).unsqueeze(1)
    # each process draws its own shuffles and bootstrap weights from the run's seed
    gen = torch.Generator().manual_seed(rank_seed(gen.initial_seed(), rank))
    weights = torch.poisson(torch.ones(n, model.heads.out_features), generator=gen)
    # about batch_size rows per step in all, and as many steps per epoch as one process would take
    local_batch = max(1, math.ceil(settings.batch_size / world))
    steps_per_epoch = math.ceil(total_n / settings.batch_size)
    epochs = max(settings.epochs, math.ceil(settings.min_steps / steps_per_epoch))
    model.train()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=gen) if n else torch.zeros(0, dtype=torch.int64)
        total = torch.zeros(2, dtype=torch.float64)  # summed loss, rows
        for step in range(steps_per_epoch):
            optimizer.zero_grad()
            if n:
                # a shard shorter than its share of the epoch starts its rows over
                idx = order[torch.arange(step * local_batch, (step + 1) * local_batch) % n]
                pred = predict(context[idx], chosen[idx])
                loss = (weights[idx] * (pred - target[idx]) ** 2).mean()
                loss.backward()
                total[0] += loss.detach() * idx.shape[0]
                total[1] += idx.shape[0]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= world
            offset_in = 0
            for p in params:
                size = p.numel()
                p.grad = flat[offset_in : offset_in + size].view_as(p).clone()
                offset_in += size
            optimizer.step()
        dist.all_reduce(total)  # on every process, whether it reports progress or not
        if progress is not None:
            progress(epoch, epochs, float(total[0] / max(total[1], 1.0)) * scale * scale)
    _fold(model, scaled, offset, scale, float(low), float(high))
    return model.eval()
