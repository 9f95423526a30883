"""Run the malformed-input corpus and the fault injections; print the figures of docs/RELIABILITY.md.

    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/reliability_report.py [--json OUT.json] [--skip-faults]

It reuses the test code (tests/test_reliability.py, tests/test_faults.py), on the tiny test
model, CPU only, one thread per run. About 3 minutes on a 2-core machine. To measure a
patched copy of the package, put it first on PYTHONPATH instead of ``src``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
try:
    import repo_rl
except ImportError:  # not installed and not on PYTHONPATH: use the checkout
    sys.path.insert(1, str(REPO / "src"))
    import repo_rl

from tests import test_faults as tf  # noqa: E402
from tests import test_reliability as tr  # noqa: E402
from tests.conftest import make_tiny_model_dir  # noqa: E402


def _line(stderr: str) -> str:
    lines = [l for l in stderr.replace("\r", "\n").splitlines() if l.strip()]
    return lines[-1][:160] if lines else ""


def corpus(tmp: Path, model: Path, good: Path) -> dict:
    rows = []
    for case in tr.CASES:
        if tr._needs_skip(case):
            continue
        res = tr.run_case(case, tmp / "corpus" / case["id"], model, good)
        rows.append({"id": case["id"], "mode": "in-process", "ok": not res["problems"], "problems": res["problems"],
                     "seconds": round(res["seconds"], 2), "bug": case.get("bug"), "message": _line(res["stderr"])})
    for cid in tr.SUBPROCESS_CASES:
        (case,) = [c for c in tr.CASES if c["id"] == cid]
        res = tr.run_case(case, tmp / "sub" / cid, model, good, mode="subprocess", timeout=180)
        rows.append({"id": cid, "mode": "subprocess", "ok": not res["problems"], "problems": res["problems"],
                     "seconds": round(res["seconds"], 2), "bug": case.get("bug"), "message": _line(res["stderr"])})
    # The 10 MB row, generated here (never checked in).
    d = tmp / "huge"
    d.mkdir(parents=True)
    data = tr._huge_row_file(d)
    out = d / "out"
    argv = ["train", "--config", str(tr._empty_config(d)), "--output-dir", str(out), *tr.tiny_overrides(model, data, **tr.BASE)]
    t0 = time.monotonic()
    rc, stderr, tb = tr._run_subprocess(argv, timeout=240)
    problems = tr.check_outcome(rc, stderr, tb, ["huge"], out)
    rows.append({"id": "ten_megabyte_row", "mode": "subprocess", "ok": not problems, "problems": problems,
                 "seconds": round(time.monotonic() - t0, 2), "bug": "trains on it: tokenizes 8M tokens, then the embedding allocation fails (traceback)",
                 "message": _line(stderr)})
    return {"cases": rows, "tried": len(rows), "handled": sum(r["ok"] for r in rows)}


def verifier() -> dict:
    from repo_rl.rewards import make_math_reward

    timeout = 0.5
    reward = make_math_reward(timeout=timeout, num_workers=2)
    try:
        reward(None, [r"\boxed{0.5}"], answer=["1/2"])
        names = list(tr.ADVERSARIAL)
        t0 = time.monotonic()
        outs = reward.outcomes([tr.ADVERSARIAL[n][0] for n in names], ["1"] * len(names))
        wall = time.monotonic() - t0
    finally:
        reward.close()
    rows = [{"id": n, "status": o.status, "elapsed": round(o.elapsed, 3), "must_time_out": tr.ADVERSARIAL[n][1]}
            for n, o in zip(names, outs)]
    ok = all(o.elapsed <= timeout + 1.0 and (o.status == "timeout" or not tr.ADVERSARIAL[n][1]) for n, o in zip(names, outs))
    return {"timeout_s": timeout, "items": rows, "tried": len(rows), "timeouts": sum(o.status == "timeout" for o in outs),
            "max_elapsed_s": round(max(o.elapsed for o in outs), 3), "batch_wall_s": round(wall, 2), "all_within_deadline": ok}


def faults(tmp: Path, model: Path) -> dict:
    world = tf.write_world(tmp / "faults", model)
    ref = tmp / "faults" / "reference"
    p = tf.cli(world, ref)
    if p.returncode != 0:
        raise SystemExit(f"the uninterrupted reference run failed:\n{p.stderr[-2000:]}")
    ref_rows = tf._read(ref / "metrics.jsonl")
    rows = []
    scenarios = list(tf.SCENARIOS) + [{"id": "before_first_checkpoint", "fault": f"generate@{tf.SAVE_EVERY}"}]
    for sc in scenarios:
        out = tmp / "faults" / sc["id"]
        res = tf.run_scenario(sc, world, ref, out)
        lost = _lost(ref_rows, out)
        rows.append({"id": sc["id"], "kill": res.get("kill"), "survived": not res["problems"], "problems": res["problems"],
                     "checkpoints_after_kill": res.get("checkpoints_after_kill"), "steps_redone": res.get("steps_redone"), **lost})
    # A full disk while writing a checkpoint (no kill): the run must stop cleanly, then resume.
    out = tmp / "faults" / "enospc"
    p = tf.cli(world, out, fault=f"save:enospc@{2 * tf.SAVE_EVERY}")
    clean = p.returncode in (1, 2) and "Traceback" not in p.stderr
    steps = tf.checkpoint_steps(out)
    redone = max(len(tf._read(out / "metrics.jsonl")) - (steps[-1] if steps else 0), 0)
    p2 = tf.cli(world, out, resume=True)
    problems = ([] if clean else [f"rc {p.returncode}, traceback: {'Traceback' in p.stderr}"])
    problems += ([] if steps == [tf.SAVE_EVERY] else [f"checkpoints after ENOSPC: {steps}"])
    problems += ([] if p2.returncode == 0 else [f"resume rc {p2.returncode}"]) + (tf.compare_runs(ref, out) if p2.returncode == 0 else [])
    rows.append({"id": "disk_full_in_checkpoint", "kill": f"save:enospc@{2 * tf.SAVE_EVERY}", "survived": not problems,
                 "problems": problems, "checkpoints_after_kill": steps, "steps_redone": redone, **_lost(ref_rows, out)})
    return {"scenarios": rows, "injected": len(rows), "survived": sum(r["survived"] for r in rows),
            "steps_lost": sum(r["steps_lost"] for r in rows), "rows_duplicated": sum(r["rows_duplicated"] for r in rows),
            "steps_redone": sum(r["steps_redone"] or 0 for r in rows)}


def _lost(ref_rows: list[dict], out: Path) -> dict:
    got = tf._read(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    ref = {r["step"]: tf._no_time([r])[0] for r in ref_rows}
    seen: dict[int, int] = {}
    for r in got:
        seen[r.get("step")] = seen.get(r.get("step"), 0) + 1
    mine = {r.get("step"): tf._no_time([r])[0] for r in got}
    lost = sum(1 for s, row in ref.items() if mine.get(s) != row)
    return {"steps_lost": lost, "rows_duplicated": sum(n - 1 for n in seen.values() if n > 1)}


def corrupted(tmp: Path, model: Path) -> dict:
    from repo_rl.cli import main

    world = tf.write_world(tmp / "corrupt", model)
    src = tmp / "corrupt" / "src"
    with contextlib.redirect_stderr(io.StringIO()):
        main(["train", "--config", str(world["config"]), "--output-dir", str(src),
              *tf.tiny_overrides(model, world["data"], **{"train.threads": 1, "train.max_steps": 1})])
    rows = []
    other = make_tiny_model_dir(tmp / "corrupt" / "model-hidden32", hidden=32)
    for name, damage in [*tf.CORRUPTIONS.items(), ("other_model", None)]:
        out = tmp / "corrupt" / name
        shutil.copytree(src, out)
        if damage is not None:
            damage(out / "checkpoints" / "step-1")
        m = other if damage is None else model
        rc, stderr, exc = tf._run_main(["train", "--config", str(world["config"]), "--output-dir", str(out), "--resume",
                                        *tf.tiny_overrides(m, world["data"], **{"train.threads": 1, "train.max_steps": 2})])
        ok = exc is None and rc == 2 and len(tf._error_lines(stderr)) == 1 and "step-1" in tf._error_lines(stderr)[0]
        rows.append({"id": name, "ok": ok, "outcome": f"rc {rc}" if exc is None else f"{type(exc).__name__} escaped"})
    return {"cases": rows, "tried": len(rows), "handled": sum(r["ok"] for r in rows)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write every figure and case to this JSON file")
    ap.add_argument("--skip-faults", action="store_true", help="corpus and verifier only")
    args = ap.parse_args()
    import torch

    t0 = time.monotonic()
    report: dict = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
                    "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores", "package": str(Path(repo_rl.__file__).parent)}
    with tempfile.TemporaryDirectory(prefix="repo-rl-reliability-") as d:
        tmp = Path(d)
        model = make_tiny_model_dir(tmp / "tiny-model")
        good = tmp / "good.jsonl"
        good.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in tf.ROWS))
        report["corpus"] = corpus(tmp, model, good)
        report["verifier"] = verifier()
        if not args.skip_faults:
            report["faults"] = faults(tmp, model)
            report["corrupted_checkpoints"] = corrupted(tmp, model)
    report["seconds"] = round(time.monotonic() - t0, 1)
    _print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


def _print(r: dict) -> None:
    c, v = r["corpus"], r["verifier"]
    print(f"# repo-rl reliability report ({r['date']}, {r['machine']}, torch {r['torch']}, {r['seconds']} s)\n")
    print("| figure | value |\n|---|---|")
    print(f"| malformed inputs tried | {c['tried']} |")
    print(f"| handled (exit 2, one line naming file/row/key, no traceback, no checkpoint or metrics row) | {c['handled']} |")
    print(f"| adversarial verifier inputs | {v['tried']} ({v['timeouts']} timeouts, max per-item {v['max_elapsed_s']} s at a {v['timeout_s']} s deadline, all within: {v['all_within_deadline']}) |")
    if "faults" in r:
        f, k = r["faults"], r["corrupted_checkpoints"]
        print(f"| faults injected (kill -9 / ENOSPC, then --resume) | {f['injected']} |")
        print(f"| survived (resumed run == uninterrupted run, checkpoints usable) | {f['survived']} |")
        print(f"| steps lost (metrics rows missing or different after resume) | {f['steps_lost']} |")
        print(f"| rows duplicated | {f['rows_duplicated']} |")
        print(f"| steps recomputed after resume (cost, not loss) | {f['steps_redone']} |")
        print(f"| corrupted checkpoints on --resume handled | {k['handled']} / {k['tried']} |")
    print("\n## Malformed inputs not handled\n")
    for row in c["cases"]:
        if not row["ok"]:
            print(f"- `{row['id']}` ({row['mode']}): {'; '.join(row['problems'])[:220]}")
    if all(row["ok"] for row in c["cases"]):
        print("none")
    if "faults" in r:
        print("\n## Fault injections\n")
        print("| scenario | fault | checkpoints left | steps redone | steps lost | duplicated | survived |\n|---|---|---|---|---|---|---|")
        for s in r["faults"]["scenarios"]:
            print(f"| {s['id']} | {s['kill']} | {s['checkpoints_after_kill']} | {s['steps_redone']} | {s['steps_lost']} | "
                  f"{s['rows_duplicated']} | {'yes' if s['survived'] else 'NO: ' + '; '.join(s['problems'])[:120]} |")
        print("\n## Corrupted checkpoints on --resume\n")
        for s in r["corrupted_checkpoints"]["cases"]:
            print(f"- `{s['id']}`: {'handled' if s['ok'] else 'NOT handled (' + s['outcome'] + ')'}")


if __name__ == "__main__":
    sys.exit(main())
