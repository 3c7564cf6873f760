"""Command line (`persona-probe`, entry point `persona_probe.cli.main:main`): the top layer, argparse over the API.

`main` assembles the parser from one module per command group (`core_cmds`, `steering`, `evaluation`, `routes`,
`organisms`, `sae`, `bench`); `common` holds the shared options and helpers, `args` adds flags whose defaults come
from the API (function signatures, config dataclasses). Nothing is re-exported here, so importing one command
module does not import them all.
"""
