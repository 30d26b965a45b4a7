"""``python3 -m unpacked``: the same as the ``unpacked`` command."""

from .cli import main

main()
