"""``python -m lightseg`` (also what ``torchrun -m lightseg train ...`` runs)."""

from lightseg.cli import main

raise SystemExit(main())
