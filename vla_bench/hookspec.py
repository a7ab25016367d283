"""Hooks that let users extend vla-bench from their own pytest plugin or conftest.py, without forking it."""
import pytest



@pytest.hookspec
def vla_bench_checkpoint_kinds():
    """Return {kind name: module path} for checkpoint families of your own.

    The module follows the contract in vla_bench/policies/kinds.py (KEYS, REQUIRED, identity, build); entries of
    checkpoints.toml can then say `kind = "<your kind>"`.
    """
