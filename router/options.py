"""The startup packet's `options` parameter: `-c name=value` and `--name=value` settings.

As libpq documents for PGOPTIONS (and postgres.c's process_postgres_switches
reads them): words separated by white space, a backslash escapes the next
character; `-c name=value`, `-cname=value` and `--name=value` set a GUC, with
dashes in the name read as underscores.
"""

from __future__ import annotations


def split_words(options: str) -> list[str]:
    words, cur, esc = [], [], False
    for ch in options:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            esc = True
        elif ch.isspace():
            if cur:
                words.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        words.append("".join(cur))
    return words


def parse_options(options: str) -> dict[str, str]:
    """Settings by lower-case name; raises ValueError for anything else in options."""
    words = split_words(options)
    out: dict[str, str] = {}
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-c" and i + 1 < len(words):
            setting, i = words[i + 1], i + 2
        elif w.startswith("-c") and len(w) > 2:
            setting, i = w[2:], i + 1
        elif w.startswith("--"):
            setting, i = w[2:], i + 1
        else:
            raise ValueError(f"invalid command-line argument in options: {w!r}")
        if "=" not in setting:
            raise ValueError(f"option {setting!r} requires a value")
        name, value = setting.split("=", 1)
        out[name.replace("-", "_").lower()] = value
    return out
