"""`python -m aetherd` runs the command line."""

from aetherd.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
