"""On ``PYTHONPATH`` for the DeepSpeed launches of tests/test_distributed.py: DeepSpeed's CPU
shared-memory all-reduce op is not built, so its collectives go through gloo as the other launches'.

DeepSpeed compiles that op with the C++ compiler at the first launch on a machine (minutes on two
busy cores), and its bf16 kernels need avx512bw (without it the op faults and the peer ranks hang).
What the tests check, the sharded gradient against one process, does not depend on it.
"""

import importlib.abc
import importlib.util
import sys


class _NoShmOp(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "deepspeed.comm.torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.build_shm_op = lambda: None

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _NoShmOp())
