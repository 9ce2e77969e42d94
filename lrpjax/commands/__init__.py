"""The ``lrpjax`` command line: `main` and one module per subcommand."""
