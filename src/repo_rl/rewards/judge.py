"""LLM-as-judge reward through any OpenAI-compatible server (``vllm serve``, SGLang, a hosted API).

The judge model reads the question, the reference answer and (the end of) a completion, and says
whether the completion's final answer matches the reference. Requests go out batched and
concurrent (``httpx``'s async client, ``concurrency`` at a time), each with a timeout and retries
with back-off on timeouts, connection errors and HTTP 429 / 5xx. A request that still fails, or a
reply without a verdict, scores the item ``None`` (left out of the loss, never 0) and is counted:
``rewards/judge_timeouts``, ``rewards/judge_errors``. Verdicts are cached on disk (SQLite) under
a key of (prompt, completion, reference, judge model, template, verdict rule), so a resumed run
or a repeated evaluation does not ask twice (``rewards/judge_cache_hits``).

The API key is read from the environment variable named by ``api_key_env`` when a request is
made; it is never stored in the object's repr, a config, a log or the cache.

Use it from TRL as a reward function::

    from repo_rl.rewards.judge import JudgeReward
    judge = JudgeReward(base_url="http://judge-host:8000/v1", model="Qwen/Qwen3-30B-A3B")
    GRPOTrainer(..., reward_funcs=[judge])          # sync, TRL's signature
    GRPOTrainer(..., reward_funcs=[judge.as_async()])  # async: TRL runs it on its event loop
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import UserError
from .base import RewardFunction, RewardStats
from .extract import completion_text
from .pool import Outcome

logger = logging.getLogger("repo_rl.rewards")

DEFAULT_TEMPLATE = (
    "You are checking a student's answer against a reference answer.\n\n"
    "Question:\n{question}\n\n"
    "Reference answer:\n{reference}\n\n"
    "Student's response:\n{answer}\n\n"
    "Does the final answer in the student's response mean the same as the reference answer? "
    "Ignore the working and the wording; judge only the final answer. Reply with one word: YES or NO."
)

_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_BRACKETED = re.compile(r"\[\[\s*(-?\d+(?:\.\d+)?)\s*\]\]")  # MT-Bench's "Rating: [[7]]"
_SCALE = re.compile(r"(?:/|\bout of\b)\s*\d+(?:\.\d+)?", re.IGNORECASE)  # the "/10" of "7/10" is not a score
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


def parse_verdict(text: str, rule: str = "yes_no", max_score: float = 10.0) -> Optional[float]:
    """A judge reply as a reward in [0, 1], or None when it holds no verdict.

    ``yes_no``: the last standalone YES or NO (any case) gives 1.0 or 0.0. ``score``: the last
    ``[[n]]`` if there is one, else the last number that is not a scale ("/10", "out of 10"),
    divided by ``max_score``; a number outside [0, max_score] is no verdict."""
    if not isinstance(text, str):
        return None
    if rule == "yes_no":
        found = _YES_NO.findall(text)
        return None if not found else (1.0 if found[-1].lower() == "yes" else 0.0)
    if rule == "score":
        bracketed = _BRACKETED.findall(text)
        found = bracketed or _NUMBER.findall(_SCALE.sub(" ", text))
        if not found:
            return None
        v = float(found[-1])
        return v / max_score if 0 <= v <= max_score else None
    raise ValueError(f"unknown verdict rule {rule!r}: expected yes_no or score")


def question_text(prompt: Any) -> str:
    """The question of a prompt: the text, or the last user message of a chat prompt."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            return str(users[-1])
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in prompt)
    return "" if prompt is None else str(prompt)


class JudgeStats(RewardStats):
    """:class:`RewardStats` plus the judge's own counters (cache hits, requests sent)."""

    __slots__ = ("cache_hits", "requests", "judge_errors", "judge_timeouts")

    def __init__(self) -> None:
        super().__init__()
        self.cache_hits = self.requests = self.judge_errors = self.judge_timeouts = 0

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"items": self.items, "errors": self.errors, "timeouts": self.timeouts, "cache_hits": self.cache_hits,
                    "requests": self.requests, "judge_errors": self.judge_errors, "judge_timeouts": self.judge_timeouts}

    def __setstate__(self, state: dict[str, int]) -> None:
        super().__setstate__(state)
        for k in ("cache_hits", "requests", "judge_errors", "judge_timeouts"):
            setattr(self, k, int(state.get(k, 0)))


class VerdictCache:
    """Verdicts on disk: one SQLite table ``key -> (score, reply)``; safe across processes.

    A cache that is not a database (a damaged or foreign file) is moved aside to
    ``<name>.corrupt-<time>`` and a new one started, with one warning; a cache that fails later
    (disk full, locked too long) is switched off for the rest of the run, with one warning. A
    verdict cache only saves requests, so neither stops training."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(os.path.expanduser(str(path)))
        self._lock = threading.Lock()
        self.enabled = True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._create()
        except sqlite3.OperationalError as e:  # locked by another run, unreadable: a good cache is never moved aside
            self._disable(f"it cannot be opened ({e})")
        except sqlite3.DatabaseError as e:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            try:
                self.path.replace(aside)
                self._create()
                logger.warning("judge cache %s is not a usable database (%s): moved it to %s and started a new one",
                               self.path, e, aside.name)
            except (OSError, sqlite3.Error) as e2:
                self._disable(f"it is not a usable database ({e}) and could not be replaced ({e2})")
        except OSError as e:
            self._disable(f"it cannot be created ({e.strerror or e})")

    def _create(self) -> None:
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, score REAL, reply TEXT, created REAL)")

    def _disable(self, why: str) -> None:
        if self.enabled:
            logger.warning("judge cache %s: %s; verdicts are not cached for the rest of this run", self.path, why)
        self.enabled = False

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def get_many(self, keys: Sequence[str]) -> dict[str, float]:
        out: dict[str, float] = {}
        if not self.enabled:
            return out
        try:
            with self._lock, self._connect() as db:
                for i in range(0, len(keys), 500):
                    chunk = list(keys[i:i + 500])
                    q = f"SELECT key, score FROM verdicts WHERE key IN ({','.join('?' * len(chunk))})"
                    out.update({k: float(v) for k, v in db.execute(q, chunk)})
        except sqlite3.Error as e:
            self._disable(f"reading failed ({type(e).__name__}: {e})")
            return {}
        return out

    def put_many(self, rows: Sequence[tuple[str, float, str]]) -> None:
        if not rows or not self.enabled:
            return
        now = time.time()
        try:
            with self._lock, self._connect() as db:
                db.executemany("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?)", [(k, s, r, now) for k, s, r in rows])
        except sqlite3.Error as e:
            self._disable(f"writing failed ({type(e).__name__}: {e})")


class JudgeReward(RewardFunction):
    """The ``judge`` reward (see the module docstring). Arguments are those of
    :class:`repo_rl.config.JudgeConfig`; :meth:`from_config` builds one from ``reward.judge``."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: Optional[str] = "OPENAI_API_KEY",
        template: str = "",
        template_file: Optional[str] = None,
        system_prompt: Optional[str] = None,
        verdict: str = "yes_no",
        max_score: float = 10.0,
        max_tokens: int = 16,
        temperature: float = 0.0,
        max_answer_chars: int = 4000,
        concurrency: int = 16,
        timeout: float = 60.0,
        retries: int = 2,
        backoff: float = 1.0,
        cache: Optional[str] = None,
        name: str = "judge",
    ) -> None:
        super().__init__(name)
        self.stats = JudgeStats()
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        if template_file:
            try:
                template = Path(template_file).read_text(encoding="utf-8")
            except OSError as e:
                raise UserError(f"reward.judge.template_file={template_file}: cannot read it ({e.strerror or e})") from None
        self.template = template or DEFAULT_TEMPLATE
        for field_ in ("{answer}",):
            if field_ not in self.template:
                raise UserError(f"reward.judge.template: has no {field_} field (it may use {{question}}, {{reference}}, {{answer}})")
        try:
            self.template.format(question="", reference="", answer="")
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"reward.judge.template: {type(e).__name__} {e}; use only {{question}}, {{reference}}, {{answer}} "
                            "and write other braces as {{ and }}") from None
        self.system_prompt = system_prompt
        parse_verdict("", verdict, max_score)  # an unknown rule fails here
        self.verdict, self.max_score = verdict, float(max_score)
        self.max_tokens, self.temperature = int(max_tokens), float(temperature)
        self.max_answer_chars = int(max_answer_chars)
        self.concurrency, self.request_timeout = int(concurrency), float(timeout)
        self.retries, self.backoff = int(retries), float(backoff)
        self.cache = VerdictCache(cache) if cache else None
        self.last_error: Optional[str] = None

    @classmethod
    def from_config(cls, jc: Any) -> "JudgeReward":
        """From a :class:`repo_rl.config.JudgeConfig`."""
        return cls(jc.base_url, jc.model, api_key_env=jc.api_key_env, template=jc.template, template_file=jc.template_file,
                   system_prompt=jc.system_prompt, verdict=jc.verdict, max_score=jc.max_score, max_tokens=jc.max_tokens,
                   temperature=jc.temperature, max_answer_chars=jc.max_answer_chars, concurrency=jc.concurrency,
                   timeout=jc.timeout, retries=jc.retries, backoff=jc.backoff, cache=jc.cache)

    def __repr__(self) -> str:
        return f"<JudgeReward {self.model} at {self.base_url}>"

    # ------------------------------------------------------------------ requests
    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def messages(self, question: str, reference: Optional[str], answer: str) -> list[dict[str, str]]:
        """The chat messages sent for one item."""
        shown = answer[-self.max_answer_chars:]
        user = self.template.format(question=question, reference="" if reference is None else reference, answer=shown)
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": user}]

    def key(self, question: str, reference: Optional[str], answer: str) -> str:
        """Cache key of one item."""
        blob = json.dumps([question, reference, answer, self.model, self.template, self.system_prompt, self.verdict, self.max_score],
                          ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    async def _ask(self, client: Any, sem: asyncio.Semaphore, msgs: list[dict[str, str]]) -> tuple[str, Any]:
        """``("ok", reply text)``, ``("timeout", message)`` or ``("error", message)``."""
        import httpx

        body = {"model": self.model, "messages": msgs, "max_tokens": self.max_tokens, "temperature": self.temperature}
        last: tuple[str, str] = ("error", "no attempt")
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            async with sem:
                self.stats.add(requests=1)
                try:
                    r = await client.post(f"{self.base_url}/chat/completions", json=body, headers=self._headers())
                except httpx.TimeoutException:
                    last = ("timeout", f"no reply within {self.request_timeout:g}s")
                    continue
                except httpx.HTTPError as e:
                    last = ("error", f"{type(e).__name__}: {str(e)[:160]}")
                    continue
            if r.status_code in _RETRY_STATUS:
                last = ("error", f"HTTP {r.status_code}")
                continue
            if r.status_code != 200:
                return "error", f"HTTP {r.status_code}: {r.text[:160]}"
            try:
                content = r.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                return "error", f"not a chat completion: {r.text[:160]!r}"
            return "ok", content if isinstance(content, str) else ""
        return last

    async def _ask_all(self, batch: list[list[dict[str, str]]]) -> list[tuple[str, Any]]:
        import httpx

        sem = asyncio.Semaphore(self.concurrency)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(timeout=self.request_timeout, limits=limits) as client:
            return await asyncio.gather(*(self._ask(client, sem, m) for m in batch))

    # ------------------------------------------------------------------ scoring
    async def aoutcomes(self, completions: Sequence[Any], answer: Sequence[Any] | str, prompts: Optional[Sequence[Any]] = None) -> list[Outcome]:
        """:meth:`outcomes`, awaitable (for a caller that runs an event loop)."""
        texts = [completion_text(c) for c in completions]
        refs = [answer] * len(texts) if isinstance(answer, str) else list(answer)
        qs = [question_text(p) for p in prompts] if prompts is not None else [""] * len(texts)
        if len(refs) != len(texts) or len(qs) != len(texts):
            raise ValueError(f"{self.__name__}: got {len(texts)} completions, {len(refs)} answers and {len(qs)} prompts")
        refs = [None if a is None else str(a) for a in refs]
        keys = [self.key(q, r, t) for q, r, t in zip(qs, refs, texts)]
        cached = self.cache.get_many(keys) if self.cache is not None else {}
        todo = [i for i, k in enumerate(keys) if k not in cached]
        replies = await self._ask_all([self.messages(qs[i], refs[i], texts[i]) for i in todo]) if todo else []
        out: list[Optional[Outcome]] = [Outcome("ok", cached[k]) if k in cached else None for k in keys]
        fresh, errors, timeouts = [], 0, 0
        for i, (status, payload) in zip(todo, replies):
            if status == "ok":
                score = parse_verdict(payload, self.verdict, self.max_score)
                if score is None:
                    status, payload = "error", f"no verdict in the reply {payload[:80]!r}"
                else:
                    out[i] = Outcome("ok", score)
                    fresh.append((keys[i], score, payload[:500]))
                    continue
            out[i] = Outcome(status, None, payload)
            self.last_error = payload
            timeouts += status == "timeout"
            errors += status == "error"
        if self.cache is not None:
            self.cache.put_many(fresh)
        self.stats.record(items=len(texts), errors=errors, timeouts=timeouts)
        self.stats.add(cache_hits=len(texts) - len(todo), judge_errors=errors, judge_timeouts=timeouts)
        if errors or timeouts:
            logger.debug("judge: %d errors, %d timeouts of %d items (last: %s)", errors, timeouts, len(texts), self.last_error)
        return [o for o in out if o is not None]

    def outcomes(self, completions: Sequence[Any], answer: Sequence[Any] | str, prompts: Optional[Sequence[Any]] = None) -> list[Outcome]:
        """Per-item results; ``prompts`` give the judge the question (optional)."""
        coro = self.aoutcomes(completions, answer, prompts)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        # Called from inside a running event loop (a notebook, an async caller): run in a thread.
        result: list[Any] = []
        err: list[BaseException] = []

        def run() -> None:
            try:
                result.append(asyncio.run(coro))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                err.append(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join()
        if err:
            raise err[0]
        return result[0]

    def _score(self, texts: list[str], golds: list[str | None]) -> list[Outcome]:
        return self.outcomes(texts, golds)

    def __call__(self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] | None = None,
                 answer: Sequence[Any] | str | None = None, **columns: Any) -> list[float | None]:
        if completions is None:
            raise TypeError(f"{self.__name__}: missing required argument 'completions'")
        if answer is None:
            raise ValueError(f"{self.__name__}: the reference answers must be passed as the 'answer' column")
        return [o.value if o.ok else None for o in self.outcomes(completions, answer, prompts)]

    def as_async(self):
        """This judge as an ``async def`` reward function with TRL's signature."""

        async def judge(prompts=None, completions=None, answer=None, **columns):
            if completions is None or answer is None:
                raise ValueError(f"{self.__name__}: needs the 'completions' and the 'answer' column")
            return [o.value if o.ok else None for o in await self.aoutcomes(completions, answer, prompts)]

        judge.__name__ = self.__name__
        return judge

    # ------------------------------------------------------------------ start-up check
    def check(self) -> None:
        """A one-line :class:`UserError` unless the server answers ``GET /models`` and serves
        :attr:`model` (a server that lists no models is given the benefit of the doubt)."""
        import httpx

        where = f"reward.judge.base_url={self.base_url}"
        try:
            r = httpx.get(f"{self.base_url}/models", headers=self._headers(), timeout=min(self.request_timeout, 10.0))
        except httpx.HTTPError as e:
            raise UserError(f"{where}: no server answers ({type(e).__name__}); start one (e.g. `vllm serve {self.model or 'MODEL'}`) "
                            "or fix the URL") from None
        if r.status_code in (401, 403):
            env = self.api_key_env or "reward.judge.api_key_env"
            raise UserError(f"{where}: the server refused the key (HTTP {r.status_code}); set ${env} to a valid key")
        if r.status_code != 200:
            raise UserError(f"{where}: GET /models answered HTTP {r.status_code}; is this an OpenAI-compatible /v1 root?")
        try:
            served = [m.get("id") for m in r.json().get("data", [])]
        except (ValueError, AttributeError):
            raise UserError(f"{where}: GET /models did not answer JSON; is this an OpenAI-compatible /v1 root?") from None
        if served and self.model not in served:
            raise UserError(f"reward.judge.model={self.model}: the server serves {', '.join(map(str, served[:5]))}, not this model")


__all__ = ["DEFAULT_TEMPLATE", "JudgeReward", "JudgeStats", "VerdictCache", "parse_verdict", "question_text"]
