"""Hooks that let users extend vla-bench from their own pytest plugin or conftest.py, without forking it.

pytest registers hook implementations only under its own `pytest_` prefix, so the plugin reads these functions
itself from every registered plugin (conftest.py files, `-p NAME` modules, installed pytest11 plugins); see
`user_checkpoint_kinds` in plugin.py. This module is their reference.
"""


def vla_bench_checkpoint_kinds():
    """Return {kind name: module path} for checkpoint families of your own.

    The module follows the contract in vla_bench/policies/kinds.py (KEYS, REQUIRED, identity, build); entries of
    checkpoints.toml can then say `kind = "<your kind>"`. In a conftest.py beside your suites, or in a plugin you
    load with `-p`:

        def vla_bench_checkpoint_kinds():
            return {"my-policy": "my_package.vla_kind"}
    """
