"""Subcommands of the ``deepssm`` CLI: each module has ``add_parser(subparsers)``; the parser it
adds sets ``run=<callable(args) -> int>`` through ``set_defaults``."""
