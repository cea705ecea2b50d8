"""The Decision Transformer on a small Llama, fed ``inputs_embeds``.

Chen et al., "Decision Transformer: Reinforcement Learning via Sequence Modeling" (arXiv
2106.01345): a trajectory is the token sequence R_0, s_0, a_0, R_1, s_1, a_1, ... (return to go,
state, action), each token a linear embedding of its vector plus a learned embedding of its
timestep, layer-normalised; a causal transformer reads it and the action a_t is predicted from the
output at s_t. Here the transformer is a transformers ``LlamaForCausalLM`` (RoPE, RMSNorm, SwiGLU,
grouped KV heads) whose "vocabulary" is the action vector: its ``lm_head`` is the action head and
``tanh(logits) * action_scale`` the action. Because it is a standard causal LM fed embeddings, the
engine runs it like any text model: the same cache, policies and eviction schedule.

Differences from the paper's MuJoCo setup: a Llama block instead of GPT-2 (RoPE positions, so
token t keeps position t under eviction), grouped KV heads (2 per layer by default), a context of
the whole episode (the horizon, e.g. 350 steps = 1,049 tokens) instead of 20 steps, and the state
normalisation and return scale held in the model (``DTConfig``), so it takes raw environment
values.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["DTConfig", "DTSize", "DecisionTransformer", "TOKENS_PER_STEP", "load_dt"]

TOKENS_PER_STEP = 3  # return to go, state, action
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "namm-decision-transformer"


@dataclass
class DTSize:
    """The sizes of a Decision Transformer (``namm rl train`` flags of the same names): hidden width,
    layers, query and KV heads, MLP width and the dropout on the token embeddings in training."""

    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    dropout: float = 0.1


@dataclass(kw_only=True)
class DTConfig(DTSize):
    """A Decision Transformer: sizes (:class:`DTSize`), the task it acts in and the statistics it
    normalises by.

    task / horizon:        the control task (``namm.rl.envs.TASKS``) and its episode length in
                           steps; the timestep embedding has ``horizon`` rows and the backbone
                           ``3 * horizon`` positions.
    state_mean, state_std: per-dimension state normalisation (from the training data).
    action_scale:          the action bound (symmetric): action = tanh(logits) * action_scale.
    return_scale:          returns to go are divided by it before embedding (1000, as the paper).
    target_return:         the return to go at t = 0 in rollouts (environment units).
    ref_returns:           {"expert": ..., "random": ...} mean returns over the horizon, which
                           normalise a score to 100 x (return - random) / (expert - random).
    """

    task: str
    state_dim: int
    act_dim: int
    horizon: int
    return_scale: float = 1000.0
    state_mean: list[float] = field(default_factory=list)
    state_std: list[float] = field(default_factory=list)
    action_scale: list[float] = field(default_factory=list)
    target_return: float = 0.0
    ref_returns: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("state_dim", "act_dim", "horizon", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DTConfig.{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads.")
        self.state_mean = list(self.state_mean) or [0.0] * self.state_dim
        self.state_std = list(self.state_std) or [1.0] * self.state_dim
        self.action_scale = list(self.action_scale) or [1.0] * self.act_dim
        if len(self.state_mean) != self.state_dim or len(self.state_std) != self.state_dim:
            raise ValueError(f"state_mean and state_std need {self.state_dim} values each.")
        if len(self.action_scale) != self.act_dim:
            raise ValueError(f"action_scale needs {self.act_dim} values.")

    @property
    def max_tokens(self) -> int:
        return TOKENS_PER_STEP * self.horizon

    def normalise(self, ret: float) -> float:
        """100 x (ret - random) / (expert - random): the D4RL normalised score."""
        expert, random = self.ref_returns.get("expert"), self.ref_returns.get("random")
        if expert is None or random is None or expert == random:
            raise ValueError("This Decision Transformer records no expert and random returns (ref_returns); "
                             "train it with `namm rl train` from data made by `namm rl data`.")
        return 100.0 * (ret - random) / (expert - random)

    def backbone_config(self):
        from transformers import LlamaConfig

        config = LlamaConfig(vocab_size=self.act_dim, hidden_size=self.hidden_size,
                             intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                             num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                             max_position_embeddings=self.max_tokens,
                             tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        config._attn_implementation = "sdpa"
        return config


class DecisionTransformer(nn.Module):
    """Embeddings of returns, states, actions and timesteps around a ``LlamaForCausalLM`` backbone.

    ``backbone`` is what the engine runs (``Engine(dt.backbone)``); :meth:`step_embeds` gives the
    tokens one environment step adds and :meth:`action` turns the backbone's logits at a state
    token into an action. :meth:`forward` is the training pass over whole trajectories.
    """

    def __init__(self, config: DTConfig) -> None:
        super().__init__()
        from transformers import LlamaForCausalLM

        self.config = config
        h = config.hidden_size
        self.embed_timestep = nn.Embedding(config.horizon, h)
        self.embed_return = nn.Linear(1, h)
        self.embed_state = nn.Linear(config.state_dim, h)
        self.embed_action = nn.Linear(config.act_dim, h)
        self.embed_ln = nn.LayerNorm(h)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.backbone = LlamaForCausalLM(config.backbone_config())
        self.register_buffer("state_mean", torch.tensor(config.state_mean, dtype=torch.float32))
        self.register_buffer("state_std", torch.tensor(config.state_std, dtype=torch.float32))
        self.register_buffer("action_scale", torch.tensor(config.action_scale, dtype=torch.float32))

    # -- tokens --------------------------------------------------------------------------------
    def _token(self, kind: str, values: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Embeddings (..., T, hidden) of one kind of token, "return" (values (..., T)), "state"
        ((..., T, S)) or "action" ((..., T, A)), at ``timesteps`` (..., T): normalised, projected,
        plus the timestep's embedding."""
        if kind == "return":
            x, layer = (values / self.config.return_scale)[..., None], self.embed_return
        elif kind == "state":
            x, layer = (values - self.state_mean) / self.state_std, self.embed_state
        else:
            x, layer = values / self.action_scale, self.embed_action
        return layer(x.to(layer.weight.dtype)) + self.embed_timestep(timesteps)

    def embed(self, returns_to_go: torch.Tensor, states: torch.Tensor, actions: torch.Tensor,
              timesteps: torch.Tensor) -> torch.Tensor:
        """The interleaved token embeddings (B, 3T, hidden): R_0, s_0, a_0, R_1, ... of a batch of
        trajectories, returns to go (B, T), states (B, T, S), actions (B, T, A), timesteps (B, T)."""
        tokens = torch.stack([self._token("return", returns_to_go, timesteps), self._token("state", states, timesteps),
                              self._token("action", actions, timesteps)], dim=2)  # (B, T, 3, hidden)
        return self.embed_dropout(self.embed_ln(tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])))

    def step_embeds(self, return_to_go: float, state, timestep: int, prev_action=None) -> torch.Tensor:
        """The tokens step ``timestep`` adds, (2 or 3, hidden): a_{t-1} (if any), R_t, s_t."""
        device = self.state_mean.device

        def vector(x) -> torch.Tensor:
            return torch.as_tensor(x, dtype=torch.float64, device=device)[None]

        t = torch.tensor([timestep], device=device)
        parts = [self._token("return", vector(float(return_to_go)), t), self._token("state", vector(state), t)]
        if prev_action is not None:
            parts.insert(0, self._token("action", vector(prev_action), t - 1))
        return self.embed_ln(torch.cat(parts))

    def action(self, logits: torch.Tensor) -> torch.Tensor:
        """The action of the backbone's logits at a state token: tanh(logits) * action_scale."""
        return torch.tanh(logits.float()) * self.action_scale

    # -- training ------------------------------------------------------------------------------
    def forward(self, returns_to_go: torch.Tensor, states: torch.Tensor, actions: torch.Tensor,
                timesteps: torch.Tensor) -> torch.Tensor:
        """Predicted actions (B, T, A), each from its state token (it sees a_t only afterwards)."""
        logits = self.backbone(inputs_embeds=self.embed(returns_to_go, states, actions, timesteps)).logits
        return torch.tanh(logits[:, 1::TOKENS_PER_STEP]) * self.action_scale.to(logits.dtype)

    # -- files ---------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, **asdict(self.config)}, indent=2),
                                        encoding="utf-8")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path / WEIGHTS_FILE))
        return path


def load_dt(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None
            ) -> DecisionTransformer:
    """A Decision Transformer folder written by ``namm rl train`` (``config.json`` + ``model.safetensors``),
    in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a Decision Transformer folder (config.json + model.safetensors); "
                                "make one with `namm rl data` then `namm rl train`.")
    data: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
    if data.pop("format", None) != FORMAT:
        raise ValueError(f"{config_path} is not a Decision Transformer config (format {FORMAT!r}).")
    known = {f.name for f in fields(DTConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"Unknown Decision Transformer config keys {unknown} in {config_path}.")
    model = DecisionTransformer(DTConfig(**data))
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    return model.to(device=device, dtype=dtype).eval()
