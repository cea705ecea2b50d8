"""namm: Neural Attention Memory Models, learned and evolved KV-cache memory for HF causal LMs."""

from __future__ import annotations

from namm.engine import Engine, EngineConfig, GenerationOutput
from namm.hf import MemoryAttachment, attach
from namm.memory import NAMM, NAMMConfig
from namm.models import load_model, tiny_model
from namm.policies import POLICIES, MemoryPolicy, make_policy
from namm.report import MemoryReport

__version__ = "0.1.0"

__all__ = ["NAMM", "POLICIES", "Engine", "EngineConfig", "GenerationOutput", "MemoryAttachment", "MemoryPolicy",
           "MemoryReport", "NAMMConfig", "attach", "load_model", "make_policy", "tiny_model"]
