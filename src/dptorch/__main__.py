"""``python -m dptorch``: the same command as the ``dptorch`` script."""

from __future__ import annotations

from dptorch.cli import main

raise SystemExit(main())
