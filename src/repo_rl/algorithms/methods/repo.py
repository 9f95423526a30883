"""RePO (arXiv 2602.10819): gated groups get verified rephrasings of the expert solution by the
current policy in place of their lowest-reward rollouts, trained as answers to q."""

from .base import Method, register_method

REPO = register_method(
    Method(
        "repo",
        "RePO: gated groups get verified rephrasings of the expert solution by the current policy "
        "in place of their lowest-reward rollouts (arXiv 2602.10819; not Replay-Enhanced PO).",
        injection="rephrase",
        requires_solution=True,
    )
)
