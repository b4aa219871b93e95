"""One module per ``esvit`` subcommand, each with ``HELP``, ``DESCRIPTION``, ``add_arguments(parser)`` and
``run(args) -> int``; :data:`esvit.cli.COMMANDS` registers them."""
