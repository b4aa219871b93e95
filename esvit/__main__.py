"""``python -m esvit`` (and ``torchrun -m esvit``) = the ``esvit`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
