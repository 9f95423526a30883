"""Prompt rendering: chat templates, the rephrase prompt P(q, k) and meta-text stripping."""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

from ..data import Example, Prompt
from ..rewards.extract import end_at_answer


class PromptRenderer:
    """Turns prompts into token ids, with the tokenizer's chat template when it has one."""

    def __init__(self, tokenizer: Any, chat_template: str = "auto", system_prompt: Optional[str] = None) -> None:
        self.tokenizer = tokenizer
        self.use_chat = chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))
        self.system_prompt = system_prompt

    def messages(self, prompt: Prompt) -> list[dict[str, str]]:
        if isinstance(prompt, str):
            msgs = [{"role": "user", "content": prompt}]
            if self.system_prompt:
                msgs.insert(0, {"role": "system", "content": self.system_prompt})
            return msgs
        return list(prompt)

    def text(self, prompt: Prompt) -> str:
        if self.use_chat:
            return self.tokenizer.apply_chat_template(self.messages(prompt), tokenize=False, add_generation_prompt=True)
        if isinstance(prompt, str):
            return prompt
        if not getattr(self, "_warned_no_template", False):
            self._warned_no_template = True
            import logging

            why = "model.chat_template=never" if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None) else "the tokenizer has no chat template"
            logging.getLogger("repo_rl").warning(
                "chat messages without a chat template (%s): each prompt's message contents are joined with a blank "
                "line, roles and the system prompt left out", why,
            )
        return "\n\n".join(m["content"] for m in prompt)

    def ids(self, prompt: Prompt) -> list[int]:
        return self.encode(self.text(prompt))

    def encode(self, text: str) -> list[int]:
        """Token ids of a rendered prompt text (:meth:`text`)."""
        # A chat template already contains the BOS token where the model wants one.
        return list(self.tokenizer(text, add_special_tokens=not self.use_chat)["input_ids"])

    def rephrase_prompt(self, example: Example, template: str, shots: Sequence[Any] = ()) -> Prompt:
        """P(q, k): the question and the expert solution in the rephrase template.

        For a chat prompt the last user message is replaced, so system messages and earlier
        turns are kept. ``shots`` (:class:`repo_rl.step.bank.BankEntry`: ``question``, ``solution``,
        ``text``) come first as earlier turns: the template filled with a shot's question and
        solution, answered by its rephrase; the prompt is then a list of messages.
        """
        if example.solution is None:
            raise ValueError(f"example {example.id} has no expert solution to rephrase")
        body = template.format(question=example.question_text, solution=example.solution)
        if isinstance(example.prompt, str) and not shots:
            return body
        turns: list[dict[str, str]] = []
        for shot in shots:
            turns.append({"role": "user", "content": template.format(question=shot.question, solution=shot.solution)})
            turns.append({"role": "assistant", "content": shot.text})
        if isinstance(example.prompt, str):
            system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            return system + turns + [{"role": "user", "content": body}]
        msgs = list(example.prompt)
        last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        return msgs[:last_user] + turns + [{"role": "user", "content": body}] + msgs[last_user + 1:]

    def rephrase_ids(self, example: Example, template: str, shots: Sequence[Any] = (), chat: bool = True) -> list[int]:
        """Token ids of :meth:`rephrase_prompt`: through the chat template like every prompt, or with
        ``chat=False`` (``repo.rephrase_chat=never``) as plain text: the user and assistant contents
        joined by blank lines, system messages left out."""
        prompt = self.rephrase_prompt(example, template, shots)
        if (chat and self.use_chat) or (not self.use_chat and not shots):
            return self.ids(prompt)
        text = prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in prompt if m["role"] != "system")
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])


def strip_meta(text: str, patterns: Sequence[str]) -> str:
    """Remove meta text (references to the expert solution, wrapper tags) from a rephrase."""
    out = text
    for p in patterns:
        out = re.sub(p, "", out)
    return out.strip() if out != text else text


def clean_rephrase(
    raw_ids: Sequence[int], tokenizer: Any, patterns: Sequence[str], max_length: int, eos_token_id: int,
    answer_ends: bool = False,
) -> tuple[list[int], str, bool, bool]:
    """A sampled rephrase as it will be verified and trained: meta text stripped
    (:func:`strip_meta`), with ``answer_ends`` (``repo.end_at_answer``) cut after its last boxed
    answer (:func:`repo_rl.rewards.extract.end_at_answer`), re-encoded with EOS when either changed
    it, cut to ``max_length`` (a rollout's ``max_completion_length``) and decoded again when cut,
    so the text verified is exactly the text trained.

    Returns ``(ids, text, stripped, cut)``.
    """
    raw = tokenizer.decode(list(raw_ids), skip_special_tokens=True)
    text = strip_meta(raw, patterns)
    if answer_ends:
        text = end_at_answer(text)
    stripped = text != raw
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [int(eos_token_id)] if stripped else list(raw_ids)
    cut = len(ids) > max_length
    if cut:
        ids = ids[:max_length]
        text = tokenizer.decode(ids, skip_special_tokens=True)
    return ids, text, stripped, cut
