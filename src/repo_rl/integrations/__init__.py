"""Adapters that put RePO into other training frameworks.

- :mod:`repo_rl.integrations.trl`: ``make_repo_rollout_func`` for TRL's ``GRPOTrainer``
  (``pip install "repo-rl[trl]"``, tested against ``trl==1.16.0``).

Nothing is imported here, so ``import repo_rl.integrations`` does not need TRL.
"""
