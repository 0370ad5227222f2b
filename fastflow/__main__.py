"""`python -m fastflow ...`: the `fastflow` command."""

from fastflow.cli import main

raise SystemExit(main())
