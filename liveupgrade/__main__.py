"""Entry point for ``python -m liveupgrade``."""

from liveupgrade.cli import main

raise SystemExit(main())
