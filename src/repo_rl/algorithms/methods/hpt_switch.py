"""HPT "switch" / ReLIFT: a group whose rollouts all fail becomes an SFT step on the expert
solution (its rollouts leave the loss). RePO's nearest ablation: same trigger, no rephrase."""

from .base import Method, register_method

HPT_SWITCH = register_method(
    Method(
        "hpt_switch",
        "HPT/ReLIFT switch: a group whose rollouts all fail is replaced by an SFT step on the expert solution.",
        injection="expert",
        gate="all_fail",
        injected_loss="sft",
        drop_group=True,
        requires_solution=True,
    )
)
