"""RePO in an existing TRL GRPO script: the only change is ``rollout_func=make_repo_rollout_func(...)``.

Runs offline on CPU in under a minute with no arguments (a tiny random Qwen2 and six toy
rows, with a weak "answer appears in the completion" reward so that some rephrases verify):

    PYTHONPATH=src python examples/trl_repo.py

With a real model and data (JSONL/Parquet/JSON rows with ``prompt``, ``answer``, ``solution``):

    python examples/trl_repo.py --model Qwen/Qwen2.5-Math-1.5B --data train.jsonl --reward math \\
        --max-steps 200 --batch-size 64 --num-generations 8 --max-completion-length 1024

Needs ``pip install "repo-rl[trl]"`` (tested with trl==1.16.0).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

TOY_ROWS = [
    {"prompt": "what is 2+3?", "answer": "5", "solution": "two plus three is 5"},
    {"prompt": "what is 4+4?", "answer": "8", "solution": "four plus four is 8"},
    {"prompt": "what is 1+6?", "answer": "7", "solution": "one plus six is 7"},
    {"prompt": "what is 3+6?", "answer": "9", "solution": "three plus six is 9"},
    {"prompt": "what is 0+2?", "answer": "2", "solution": "zero plus two is 2"},
    {"prompt": "what is 5+1?", "answer": "6", "solution": None},  # no solution: never rephrased
]


def contains_answer(prompts, completions, answer, **kwargs):
    """Toy reward: 1.0 when the reference answer occurs in the completion."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [1.0 if a in t else 0.0 for t, a in zip(texts, answer)]


def tiny_model(path: Path) -> str:
    """A random 2-layer Qwen2 with the toy world's character tokenizer, saved to ``path``."""
    from repo_rl.models.tiny import save_tiny_model_dir
    from repo_rl.toyworld.tokenizer import build_tokenizer

    tok = build_tokenizer()
    tok.model_max_length = 2048
    save_tiny_model_dir(path, tok, hidden_size=64, intermediate_size=128, max_position_embeddings=1024, seed=0)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="TRL GRPO with RePO rephrase injection")
    ap.add_argument("--model", help="model directory or hub id (default: a tiny random Qwen2, offline)")
    ap.add_argument("--data", help="training file (.jsonl/.json/.parquet) or datasets name (default: six toy rows)")
    ap.add_argument("--reward", default=None, help="repo_rl reward: math | numeric | choice | pkg.mod:fn (default: math, or a toy reward without --model)")
    ap.add_argument("--output-dir", default=None)
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=12, help="completions per step (per device)")
    ap.add_argument("--num-generations", type=int, default=4)
    ap.add_argument("--max-completion-length", type=int, default=16)
    ap.add_argument("--learning-rate", type=float, default=1e-6)
    ap.add_argument("--rho", type=float, default=0.5, help="gate: rephrase when the failure fraction >= rho")
    ap.add_argument("--delta", type=float, default=0.5, help="a completion with reward < delta fails")
    ap.add_argument("--num-attempts", type=int, default=4, help="rephrase samples per gated group")
    args = ap.parse_args(argv)

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from repo_rl.run.health import quiet_deepspeed_probe

    quiet_deepspeed_probe()  # no "could not find a GPU" warning from DeepSpeed on a CPU machine
    # TRL 1.16 reads model.is_gradient_checkpointing at every step, a name transformers 5.24 deprecates.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from repo_rl.integrations.trl import make_repo_rollout_func
    from repo_rl.rewards import load_reward

    work = Path(args.output_dir or tempfile.mkdtemp(prefix="trl-repo-"))
    model = args.model or tiny_model(work / "tiny-model")
    if args.data:
        suffix = Path(args.data).suffix.lower()
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix)
        train = datasets.load_dataset(kind, data_files=args.data, split="train") if kind else datasets.load_dataset(args.data, split="train")
    else:
        train = datasets.Dataset.from_list(TOY_ROWS)
    if args.reward:
        reward = load_reward(args.reward)
    else:
        reward = contains_answer if args.model is None else load_reward("math")

    # --- the TRL script; RePO is the rollout_func line ----------------------------------
    config = GRPOConfig(
        output_dir=str(work / "run"),
        per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=args.model is None,
        activation_checkpointing=False,  # the example's models are small (TRL turns it on by default)
    )
    # verify=("strict",), the default, takes only a final \boxed{} answer; the tiny random model of the
    # default run boxes nothing, so it is verified by the reward on the whole text.
    verify = ("reward",) if args.model is None else ("strict",)
    rollout = make_repo_rollout_func(train, delta=args.delta, rho=args.rho, num_attempts=args.num_attempts, verify=verify)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=train, rollout_func=rollout)
    trainer.train()
    # -------------------------------------------------------------------------------------

    for h in trainer.state.log_history:
        if "repo/gate_rate" in h:
            print(
                f"step {h['step']}: reward {h['reward']:.3f}  repo/gate_rate {h['repo/gate_rate']:.2f}  "
                f"repo/rephrase_success_rate {h['repo/rephrase_success_rate']}  repo/replaced {h['repo/replaced']:.0f}"
            )
    print("totals:", rollout.stats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
