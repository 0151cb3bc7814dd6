"""``python -m deltafix``: the same CLI as the ``deltafix`` console script, for environments
where the script is not on PATH (a venv used without activating it, CI steps)."""

from deltafix.cli import main

raise SystemExit(main())
