"""The judge reward against a real judge model behind ``vllm serve`` (the vLLM environment).

A tiny random model stands in for the judge, so its verdicts are noise: the test checks the
plumbing (start-up check, chat-completions requests, replies read, nothing timed out, cache),
not the verdicts. Marked ``vllm``; ``.ci/run`` runs it in the vLLM environment.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from repo_rl.rewards.judge import JudgeReward

from .conftest import make_tokenizer

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import httpx

    from repo_rl.models.tiny import save_tiny_model_dir

    d = tmp_path_factory.mktemp("judge-model")
    save_tiny_model_dir(d / "model", make_tokenizer(), hidden_size=64, num_heads=2, num_kv_heads=1)
    (d / "chat.jinja").write_text(CHAT_TEMPLATE)
    port = _free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING", HF_HUB_OFFLINE="1")
    log = open(d / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(d / "model"), "--served-model-name", "tiny-judge",
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
         "--chat-template", str(d / "chat.jinja")],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 240
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}: {(d / 'serve.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm serve did not come up in 240 s: {(d / 'serve.log').read_text()[-2000:]}")
            time.sleep(2)
        yield url, d
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_judge_against_vllm_serve(served):
    url, d = served
    j = JudgeReward(url, "tiny-judge", max_tokens=4, timeout=60, cache=str(d / "cache.sqlite"))
    j.check()
    prompts = ["what is 2+3?", "name a colour", "4+4=", "hello", "a b c", "what is 1+1?"]
    outs = j.outcomes(["5", "red", "8", "hi", "d", "2"], ["5", "blue", "8", "hey", "d", "3"], prompts)
    s = j.stats.snapshot()
    assert s["requests"] == 6 and s["judge_timeouts"] == 0
    # Every request was answered (HTTP 200 with a chat completion); a random model's reply may hold
    # no verdict, which is an error of that item, never a transport error.
    for o in outs:
        assert o.status == "ok" or (o.status == "error" and o.error.startswith("no verdict")), o
    verdicts = sum(o.ok for o in outs)
    again = JudgeReward(url, "tiny-judge", max_tokens=4, cache=str(d / "cache.sqlite"))
    again.outcomes(["5", "red", "8", "hi", "d", "2"], ["5", "blue", "8", "hey", "d", "3"], prompts)
    assert again.stats.snapshot()["cache_hits"] == verdicts and again.stats.snapshot()["requests"] == 6 - verdicts
    with pytest.raises(Exception, match="not this model"):
        JudgeReward(url, "another-model").check()
