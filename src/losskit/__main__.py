"""`python -m losskit`: the `losskit` command."""

from .cli.main import main

if __name__ == "__main__":  # importing the module (e.g. to document it) runs nothing
    raise SystemExit(main())
