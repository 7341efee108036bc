"""The kimi-cluster command line (`kimi-cluster`, `python -m cluster.cli`): main.py builds the parser from one
module per group of subcommands; options.py holds the options they share."""
