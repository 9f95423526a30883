"""Loading the policy model and tokenizer from a local directory, a hub id or a built-in name."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import UserError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str, toyworld_settings: Any = None) -> str:
    """Map built-in names to directories: ``toyworld`` and ``smollm2-135m-instruct``."""
    if name_or_path == "toyworld":
        from . import toyworld
        from .config import ToyWorldSettings

        return str(toyworld.ensure_model((toyworld_settings or ToyWorldSettings()).world_config()))
    if name_or_path.lower() in ("smollm2-135m-instruct", "smollm2"):
        from .smollm import ensure_smollm2

        return str(ensure_smollm2())
    return name_or_path


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: Optional[str] = None) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise UserError(f"model.name_or_path={path}: tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_model_and_tokenizer(mcfg: Any, toyworld_settings: Any = None, device: str = "cpu") -> tuple[Any, Any, str]:
    """Load ``(model, tokenizer, resolved_path)``. Raises UserError for a path that is not a model."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(mcfg.name_or_path, toyworld_settings)
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir() or not (local / "config.json").is_file():
            raise UserError(f"model.name_or_path={path}: not a model directory (no config.json)")
        path = str(local)
    elif not _looks_like_hub_id(path):
        raise UserError(f"model.name_or_path={path}: no such directory, and not a hub id (owner/name)")
    elif os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(f"model.name_or_path={path}: not a local directory and HF_HUB_OFFLINE=1 forbids downloading it")
    try:
        tok = load_tokenizer(path, mcfg.trust_remote_code, mcfg.revision)
        dtype = _DTYPES.get(mcfg.dtype, "auto")
        model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=mcfg.trust_remote_code, revision=mcfg.revision, dtype=dtype
        )
    except UserError:
        raise
    except Exception as e:  # transformers raises many types (OSError, ValueError, KeyError)
        first = str(e).strip().splitlines()[0][:240] if str(e).strip() else type(e).__name__
        raise UserError(f"model.name_or_path={path}: cannot load a causal LM ({type(e).__name__}: {first})") from None
    model.to(device)
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok, path


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token id that ends a completion: the tokenizer's EOS and the generation config's."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(int(e) for e in gen_eos)
    if not ids:
        raise UserError("the tokenizer and generation config define no EOS token; completions could never end")
    return sorted(ids)


def apply_lora(model: Any, lora: Any) -> Any:
    """Wrap ``model`` with LoRA adapters (peft). Only adapter weights are trained and saved."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("model.lora.r > 0 needs peft: pip install 'repo-rl[lora]'") from None
    targets = lora.target_modules
    try:
        return get_peft_model(
            model,
            LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM"),
        )
    except ValueError as e:
        raise UserError(f"model.lora.target_modules={targets}: {str(e).splitlines()[0][:200]}") from None
