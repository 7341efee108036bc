"""`python -m cluster.cli`: the kimi-cluster command."""
import sys

from cluster.cli.main import main

sys.exit(main())
