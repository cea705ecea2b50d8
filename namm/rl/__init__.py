"""Beyond language: a Decision Transformer testbed for KV-cache memory policies.

The NAMM paper (Cetin et al., arXiv 2410.13166) transfers a memory model evolved on language to a
Decision Transformer (Chen et al., arXiv 2106.01345) on continuous control. This package builds
the testbed, offline and on CPU:

* :mod:`namm.rl.envs`: the control tasks (gymnasium + MuJoCo; ``pip install 'namm[rl]'``).
* :mod:`namm.rl.expert`: an expert trained in minutes on 2 cores (Augmented Random Search).
* :mod:`namm.rl.data`: mixed-quality offline datasets (expert, medium, replay, noisy), with the
  expert and random returns that normalise scores (expert = 100, random = 0).
* :mod:`namm.rl.model`: the Decision Transformer, a small Llama backbone fed ``inputs_embeds``.
* :mod:`namm.rl.train`: deterministic training; writes ``model.safetensors`` + ``config.json``.
* :mod:`namm.rl.rollout`: episodes in the environment whose every step goes through the engine,
  its memory policy and its eviction schedule.
* :mod:`namm.rl.evaluate`: ``namm eval --tasks rl:<task>``, normalised return per method and setting.

Commands: ``namm rl data``, ``namm rl train``, then ``namm eval --tasks rl:halfcheetah ...``.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

__all__ = ["require_rl", "torch_threads"]

INSTALL_HINT = "pip install 'namm[rl]'   (or: pip install 'gymnasium[mujoco]>=1.0,<2' 'mujoco>=3.1,<4')"


def require_rl():
    """Import and return ``gymnasium``, with an error that says what to install when it is missing.

    MuJoCo's warnings go to :mod:`logging` (logger ``mujoco``) instead of stderr and a
    ``MUJOCO_LOG.TXT`` in the working folder; its compiler's deprecation notices (gymnasium's
    HalfCheetah model uses ``settotalmass``) at debug level.
    """
    try:
        import gymnasium
        import mujoco
    except ImportError as exc:
        raise ImportError(f"The reinforcement-learning testbed needs gymnasium and MuJoCo ({exc.name} is "
                          f"missing). Install them with: {INSTALL_HINT}") from exc
    if mujoco.get_mju_user_warning() is None:
        mujoco.set_mju_user_warning(_mujoco_warning)
    return gymnasium


def _mujoco_warning(message: str) -> None:
    level = logging.DEBUG if "deprecated" in message else logging.WARNING
    logging.getLogger("mujoco").log(level, "%s", message.strip())


@contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch CPU threads (None: as they are), then restore the count."""
    import torch

    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
