"""Inference engines beyond the built-in HF sampler (:class:`repo_rl.rollout.HFGenerator`).

Each engine implements :class:`repo_rl.rollout.Generator` and is registered by name in
:data:`repo_rl.rollout.GENERATORS`; its heavy imports happen only when it is built.
"""
