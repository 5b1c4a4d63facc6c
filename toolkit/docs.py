"""`python -m toolkit.docs`: regenerate README's config reference from the dataclasses (never hand-copied)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from toolkit.config import describe_fields

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def config_block() -> str:
    return f"{START}\n```\n{describe_fields()}\n```\n{END}"


def update_readme(path: str | Path = "README.md") -> bool:
    """Rewrite the block between the markers; True when the file changed."""
    path = Path(path)
    text = path.read_text()
    new = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: config_block(), text, flags=re.S)
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    changed = update_readme(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    print("README config reference", "updated" if changed else "already current")
