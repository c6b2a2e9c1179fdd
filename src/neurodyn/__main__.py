"""``python -m neurodyn ...`` is the same as the ``neurodyn`` command."""

from neurodyn.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
