"""Keep the README's configuration table equal to the schema.

    python -m conf.readme          rewrite the table in README.md
"""

from __future__ import annotations

from pathlib import Path

from conf.docs import render_table

README = Path(__file__).resolve().parents[1] / "README.md"
START = "<!-- config-table:start -->"
END = "<!-- config-table:end -->"


def rendered(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{render_table()}\n{END}{tail}"


if __name__ == "__main__":
    README.write_text(rendered(README.read_text()))
