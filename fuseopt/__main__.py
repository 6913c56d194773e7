"""``python -m fuseopt``: the same as the ``fuseopt`` command."""

from fuseopt.cli import main

raise SystemExit(main())
