"""Train a Decision Transformer on an offline dataset, deterministically, on CPU.

Each step draws ``batch_size`` trajectory windows (episodes in proportion to their length, as the
paper does): with probability ``full_episode_prob`` a whole episode from t = 0 (the condition of an
evaluation rollout, whose cache holds the episode so far), else one starting at a uniform step
and running to the episode's end (what the model sees once old steps are evicted, since RoPE makes
positions relative). Windows are right-padded; with causal attention the padding never reaches a
real token, and the loss (mean squared error of the predicted actions) skips it. AdamW, linear
warm-up then cosine decay to a tenth, gradient clipping, dropout on the token embeddings.

The seed fixes the initial weights, the windows and the dropout masks, so a run is repeatable on
the same machine and thread count. Output: ``model.safetensors`` + ``config.json``
(:func:`namm.rl.model.load_dt`) and ``train_log.csv``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from namm.rl import torch_threads
from namm.rl.data import OfflineData, load_dataset
from namm.rl.envs import get_task
from namm.rl.model import DecisionTransformer, DTConfig, DTSize

__all__ = ["TrainConfig", "default_model_dir", "train", "returns_to_go"]

log = logging.getLogger(__name__)


def default_model_dir(task: str) -> Path:
    """Where ``namm rl train`` writes a task's Decision Transformer by default."""
    return Path("runs") / "rl" / get_task(task).name / "dt"


@dataclass
class TrainConfig(DTSize):
    """One training run and the model's sizes (:class:`~namm.rl.model.DTSize`); the
    ``namm rl train`` flags map onto these fields.

    target_return: the return to go a rollout starts from (None: the best episode return in the
                   data, the most the model has seen achieved; the paper conditions on such targets).
    threads:       torch threads (1 when other jobs share the cores).
    """

    steps: int = 1500
    batch_size: int = 8
    lr: float = 6e-4
    warmup: int = 100
    weight_decay: float = 1e-4
    grad_clip: float = 0.25
    full_episode_prob: float = 0.5
    seed: int = 0
    threads: int = 1
    target_return: float | None = None
    log_every: int = 50

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "threads", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not 0 <= self.full_episode_prob <= 1:
            raise ValueError(f"full_episode_prob must be in [0, 1], got {self.full_episode_prob!r}.")
        if self.lr <= 0 or self.warmup < 0:
            raise ValueError("lr must be positive and warmup non-negative.")


def returns_to_go(rewards: np.ndarray) -> np.ndarray:
    """R_t = sum of the rewards from t to the episode's end (float64)."""
    return np.cumsum(rewards[::-1].astype(np.float64))[::-1].copy()


def model_config(data: OfflineData, config: TrainConfig) -> DTConfig:
    """The Decision Transformer's config: sizes from ``config``, everything about the task from the data."""
    meta = data.meta
    std = data.observations.std(axis=0)
    best = max(float(data.rewards[e].sum(dtype=np.float64)) for e in data.episodes())
    target = config.target_return if config.target_return is not None else best
    return DTConfig(
        task=meta["task"], state_dim=meta["state_dim"], act_dim=meta["act_dim"], horizon=meta["horizon"],
        **{f.name: getattr(config, f.name) for f in fields(DTSize)},
        state_mean=data.observations.mean(axis=0).astype(float).tolist(),
        state_std=np.where(std < 1e-6, 1.0, std).astype(float).tolist(),
        action_scale=list(meta["action_high"]),
        target_return=float(target),
        ref_returns={"expert": meta["ref_returns"]["expert"], "random": meta["ref_returns"]["random"]},
    )


class WindowSampler:
    """Batches of right-padded trajectory windows (see the module docstring), from one generator."""

    def __init__(self, data: OfflineData, config: TrainConfig) -> None:
        self.episodes = data.episodes()
        self.data, self.config = data, config
        lengths = np.array([e.stop - e.start for e in self.episodes], dtype=np.float64)
        self.weights = torch.tensor(lengths / lengths.sum())
        self.rtg = np.concatenate([returns_to_go(data.rewards[e]) for e in self.episodes])
        self.generator = torch.Generator().manual_seed(config.seed)

    def batch(self) -> dict[str, torch.Tensor]:
        """returns_to_go (B, T), states (B, T, S), actions (B, T, A), timesteps (B, T) and mask (B, T)."""
        g, config = self.generator, self.config
        picks = torch.multinomial(self.weights, config.batch_size, replacement=True, generator=g).tolist()
        windows = []
        for i in picks:
            episode = self.episodes[i]
            n = episode.stop - episode.start
            full = float(torch.rand((), generator=g)) < config.full_episode_prob
            start = 0 if full else int(torch.randint(0, n, (), generator=g))
            windows.append((episode.start + start, episode.stop, start))
        longest = max(stop - first for first, stop, _ in windows)
        out = {"returns_to_go": torch.zeros(len(windows), longest, dtype=torch.float64),
               "states": torch.zeros(len(windows), longest, self.data.observations.shape[1]),
               "actions": torch.zeros(len(windows), longest, self.data.actions.shape[1]),
               "timesteps": torch.zeros(len(windows), longest, dtype=torch.long),
               "mask": torch.zeros(len(windows), longest, dtype=torch.bool)}
        for row, (first, stop, start) in enumerate(windows):
            n = stop - first
            out["returns_to_go"][row, :n] = torch.from_numpy(self.rtg[first:stop])
            out["states"][row, :n] = torch.from_numpy(self.data.observations[first:stop])
            out["actions"][row, :n] = torch.from_numpy(self.data.actions[first:stop])
            out["timesteps"][row, :n] = torch.arange(start, start + n)
            out["mask"][row, :n] = True
        return out


def _schedule(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def train(data_dir: str | Path, out: str | Path | None = None, config: TrainConfig | None = None,
          progress: bool = True) -> DecisionTransformer:
    """Train on the dataset in ``data_dir`` (``namm rl data``) and write the model to ``out``
    (default: ``runs/rl/<task>/dt``)."""
    config = config or TrainConfig()
    data = load_dataset(data_dir)
    out = Path(out) if out is not None else default_model_dir(data.meta["task"])
    with torch_threads(config.threads):
        model, log_rows = _fit(data, config, progress)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    (out / "train_config.json").write_text(json.dumps({"data": str(data_dir), "dataset_sha256":
                                                       data.meta.get("dataset_sha256"), **asdict(config)}, indent=2),
                                           encoding="utf-8")
    with (out / "train_log.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "loss", "lr", "seconds"])
        writer.writeheader()
        writer.writerows(log_rows)
    return model


def _fit(data: OfflineData, config: TrainConfig, progress: bool) -> tuple[DecisionTransformer, list[dict]]:
    """The training loop; returns the model in eval mode and the log rows."""
    torch.manual_seed(config.seed)
    model = DecisionTransformer(model_config(data, config)).train()
    sampler = WindowSampler(data, config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed_timestep" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed_timestep" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    log_rows, started, bar = [], time.perf_counter(), _bar(config.steps, progress)
    for step in range(config.steps):
        batch = sampler.batch()
        predicted = model(batch["returns_to_go"], batch["states"], batch["actions"], batch["timesteps"])
        mask = batch["mask"]
        loss = ((predicted - batch["actions"]) ** 2)[mask].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        bar.set_postfix_str(f"loss {loss.item():.4f}")
        bar.update(1)
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            log_rows.append({"step": step + 1, "loss": round(loss.item(), 6), "lr": scheduler.get_last_lr()[0],
                             "seconds": round(time.perf_counter() - started, 2)})
    bar.close()
    return model.eval(), log_rows


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="step", desc="train DT", dynamic_ncols=True)
