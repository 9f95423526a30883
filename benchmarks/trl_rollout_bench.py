"""Step time of TRL GRPO with the RePO rollout function vs plain TRL GRPO (and our own trainer).

    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/trl_rollout_bench.py [--rounds 3 --steps 2]

A tiny random Qwen2 (hidden 128, 2 layers, the toy world's char tokenizer), 8 prompts x G=8 =
64 completions of up to 16 tokens per step, one optimizer step per generation, 2 torch threads.
Setups, interleaved round by round (after one untimed warm-up step of every setup, each of
``--rounds`` rounds runs ``--steps`` timed steps of every setup in turn):

- ``trl``: plain ``GRPOTrainer`` (its own ``model.generate`` path);
- ``trl+repo (no solutions)``: the RePO rollout function on a dataset without solutions, so
  the gate never fires: the cost of our generation path and of scoring twice;
- ``trl+repo``: the RePO rollout function, gate on (most groups fail on a random model);
- ``repo_rl.trainer (repo)``: our own trainer's RePO step, same sizes.

Step time is wall time from ``on_step_begin`` to ``on_step_end`` (generation, scoring,
rephrasing, loss, backward, optimizer). Prints a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def contains_answer(prompts, completions, answer, **kwargs):
    """1.0 when the reference answer occurs in the completion (cheap, so timing shows the rollout)."""
    return [1.0 if a in (c if isinstance(c, str) else c[-1]["content"]) else 0.0 for c, a in zip(completions, answer)]


def _rows(n: int) -> list[dict]:
    out = []
    for i in range(n):
        a, b = i % 10, (3 * i + 1) % 10
        out.append({"id": f"q{i}", "prompt": f"what is {a}+{b}?", "answer": str(a + b), "solution": f"{a} plus {b} is {a + b}"})
    return out


def _model_dir(path: Path) -> Path:
    from repo_rl.models.tiny import save_tiny_model_dir
    from repo_rl.toyworld.tokenizer import build_tokenizer

    tok = build_tokenizer()
    tok.model_max_length = 2048
    tok.padding_side = "left"
    save_tiny_model_dir(path, tok, hidden_size=128, intermediate_size=256, max_position_embeddings=1024, seed=0)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1, help="timed steps of each setup per round")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--no-ours", action="store_true", help="skip repo_rl.trainer")
    args = ap.parse_args(argv)

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    from repo_rl.integrations.trl import make_repo_rollout_func

    G, P, T = 8, 8, 16
    work = Path(tempfile.mkdtemp(prefix="trl-bench-"))
    model_dir = _model_dir(work / "model")
    rows = _rows(64)
    ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "answer", "solution")} for r in rows])
    ds_nosol = ds.map(lambda r: {"solution": None})

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.t0 = 0.0

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    def make_trl(name: str, dataset, rollout):
        cfg = GRPOConfig(
            output_dir=str(work / name.replace(" ", "_")),
            per_device_train_batch_size=P * G,
            num_generations=G,
            max_completion_length=T,
            max_steps=1,
            learning_rate=1e-6,
            beta=0.0,
            logging_steps=1,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        timer = Timer()
        tr = GRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(model_dir),
            reward_funcs=[contains_answer],
            args=cfg,
            train_dataset=dataset,
            processing_class=AutoTokenizer.from_pretrained(model_dir),
            rollout_func=rollout,
            callbacks=[timer],
        )
        tr.remove_callback(PrinterCallback)  # keep stdout for the table
        return {"name": name, "trainer": tr, "timer": timer, "logs": []}

    setups = [
        make_trl("trl", ds, None),
        make_trl("trl+repo (no solutions)", ds_nosol, make_repo_rollout_func(ds_nosol, verify=("reward",))),
        make_trl("trl+repo", ds, make_repo_rollout_func(ds, verify=("reward",))),  # the tiny model boxes nothing
    ]
    ours = None
    if not args.no_ours:
        from repo_rl.config import build_config
        from repo_rl.trainer import Trainer

        data = work / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        cfg = build_config(
            {},
            [
                f"model.name_or_path={model_dir}",
                f"data.train_files={data}",
                "reward.funcs=[trl_rollout_bench:contains_answer]",
                "algorithm.method=repo",
                f"algorithm.num_generations={G}",
                f"algorithm.max_completion_length={T}",
                f"train.prompts_per_step={P}",
                f"train.micro_batch_size={P * G}",
                "train.learning_rate=1e-6",
                f"train.threads={args.threads}",
                "train.save_every=0",
                "train.log_completions=false",
                "logging.progress=false",
            ],
        )
        ours = {"name": "repo_rl.trainer (repo)", "trainer": Trainer(cfg, work / "ours", progress=False), "times": [], "logs": []}

    t_start = time.perf_counter()
    for r in range(args.rounds + 1):  # round 0: one warm-up step of each setup, not timed
        n = 1 if r == 0 else args.steps
        for s in setups:
            tr = s["trainer"]
            tr.args.max_steps = n
            tr.train()
            if r == 0:
                s["timer"].times.clear()
            else:
                s["logs"].extend(h for h in tr.state.log_history if "loss" in h)
        if ours is not None:
            for _ in range(n):
                t0 = time.perf_counter()
                m = ours["trainer"].train_step()
                if r > 0:
                    ours["times"].append(time.perf_counter() - t0)
                    ours["logs"].append(m)
    total = time.perf_counter() - t_start

    def summary(name, times, logs, gate_key, repl_key, len_key):
        kept = times
        med, low = statistics.median(kept), min(kept)
        gate = statistics.mean(float(h.get(gate_key) or 0.0) for h in logs) if logs else float("nan")
        repl = statistics.mean(float(h.get(repl_key) or 0.0) for h in logs) if logs else float("nan")
        length = statistics.mean(float(h.get(len_key) or 0.0) for h in logs) if logs else float("nan")
        return name, med, low, len(kept), gate, repl, length

    results = [summary(s["name"], s["timer"].times, s["logs"], "repo/gate_rate", "repo/replaced", "completions/mean_length") for s in setups]
    if ours is not None:
        results.append(summary(ours["name"], ours["times"], ours["logs"], "repo/gate_rate", "repo/replaced", "completions/mean_length"))
    base = results[0][1]
    print(f"TRL {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
          f"{P} prompts x G={G} = {P * G} completions x <= {T} tokens per step; total {total:.0f} s\n")
    print("| setup | median step (s) | vs plain TRL | fastest step (s) | steps timed | gate rate | rephrases injected / step | mean completion length |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, med, low, n, gate, repl, length in results:
        print(f"| {name} | {med:.3f} | {med / base:.2f}x | {low:.3f} | {n} | {gate:.2f} | {repl:.1f} | {length:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
