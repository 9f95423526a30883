"""The toy world: repo-rl's embedded default task family, tokenizer and tiny warm-started model.

RePO vs baselines in minutes on a laptop CPU. See :mod:`repo_rl.toyworld.world` for the task
formats and :mod:`repo_rl.toyworld.warmstart` for the warm start and model cache.

    from repo_rl.toyworld import ToyWorldConfig, ensure_model, write_datasets
    cfg = ToyWorldConfig(variant="hard_rephrase")
    model_dir = ensure_model(cfg)          # cached / shipped / warm-started HF directory
    files = write_datasets(cfg, "data/toy")
"""

from .evaluate import accuracy, evaluate_splits, generate_greedy, rephrase_rows
from .tokenizer import build_tokenizer
from .model import build_model, model_config
from .warmstart import build_shipped, cache_root, ensure_model, warm_start
from .world import (
    REPHRASE_TEMPLATE,
    SPLITS,
    WORLD_VERSION,
    ToyWorldConfig,
    extract_answer,
    generate_rows,
    get_world,
    parse_expert,
    parse_native,
    toy_reward,
    write_datasets,
)

__all__ = [
    "REPHRASE_TEMPLATE",
    "SPLITS",
    "WORLD_VERSION",
    "ToyWorldConfig",
    "accuracy",
    "build_model",
    "build_shipped",
    "build_tokenizer",
    "cache_root",
    "ensure_model",
    "evaluate_splits",
    "extract_answer",
    "generate_greedy",
    "generate_rows",
    "get_world",
    "model_config",
    "parse_expert",
    "parse_native",
    "rephrase_rows",
    "toy_reward",
    "warm_start",
    "write_datasets",
]

try:  # register with the rewards registry when it exists (written in parallel)
    from repo_rl.rewards import register_reward as _register_reward
except ImportError:
    _register_reward = None
if _register_reward is not None:
    try:
        _register_reward("toy", toy_reward)
    except ValueError:  # "toy" already registered (e.g. as a lazy "module:attr" path): keep it
        pass
