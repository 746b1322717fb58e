"""The ``ebm`` command line: a thin front end that composes the packages' own subcommands (ebm_sim, distill,
hardware, ebm_pipeline each expose ``add_parsers(sub)`` in their ``commands`` module) and runs them with one error
and exit-status convention (ebm_cli.main). Nothing imports ebm_cli; it sits on top of the dependency graph.
"""
