"""Custom reward functions used by the tests through dotted import paths."""


def _text(c):
    return c if isinstance(c, str) else c[-1]["content"]


def contains_answer(prompts, completions, answer, **kwargs):
    """1.0 when the reference answer occurs anywhere in the completion (a weak, easy reward)."""
    return [1.0 if a in _text(c) else 0.0 for c, a in zip(completions, answer)]


def always_none(prompts, completions, answer, **kwargs):
    """Every item is a verifier failure."""
    return [None for _ in completions]


not_callable = 42


def text_length(prompts, completions, answer, **kwargs):
    """Completion length in characters / 10: differs within almost every group (a dense signal)."""
    return [len(_text(c)) / 10.0 for c in completions]


def always_one(prompts, completions, answer, **kwargs):
    """1.0 for everything: every group has zero reward variance, so every advantage is 0."""
    return [1.0 for _ in completions]


def flat_for_even_answers(prompts, completions, answer, **kwargs):
    """1.0 where the answer is even (zero-variance groups), completion length / 10 elsewhere."""
    return [1.0 if int(a) % 2 == 0 else len(_text(c)) / 10.0 for c, a in zip(completions, answer)]


def vowel_share(prompts, completions, answer, **kwargs):
    """Share of vowels in the completion: differs within groups even when every length is equal."""
    return [sum(ch in "aeiou" for ch in _text(c)) / max(len(_text(c)), 1) for c in completions]


def fail_odd_answers(prompts, completions, answer, **kwargs):
    """1.0 where the answer is even; below 0.5 (failures that still differ) elsewhere."""
    return [1.0 if int(a) % 2 == 0 else len(_text(c)) / 20.0 for c, a in zip(completions, answer)]


def mentions_solution_word(prompts, completions, answer, solution, **kwargs):
    """A custom rephrase check: 1.0 when the completion names the first word of the expert solution
    (its unit, in the domain-world style ``wemble:clot = 1:6 ...``)."""
    return [1.0 if s and s.split(":")[0].split()[0] in _text(c) else 0.0 for c, s in zip(completions, solution)]


def needs_working(prompts, completions, answer, **kwargs):
    """1.0 when the answer occurs in text before a final box, so a boxed answer alone never passes
    (a reward that needs the whole text, like a format reward)."""
    return [1.0 if a in _text(c).split("\\boxed")[0] else 0.0 for c, a in zip(completions, answer)]
