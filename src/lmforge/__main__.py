"""``python -m lmforge``: the ``lmforge`` command."""

from lmforge.cli.main import main

if __name__ == "__main__":
    main()
