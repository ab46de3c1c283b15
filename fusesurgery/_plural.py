"""The one way fusesurgery writes a count of things ("1 check", "2 checks").

It lives at the package root, beside ``_sizes``, so that every layer's messages can use it
without importing a later one (and without torch).
"""

from __future__ import annotations


def plural(count: int, word: str, many: str | None = None, *, spec: str = "") -> str:
    """``count`` and ``word``, the word in its plural form unless ``count`` is 1.

    ``plural(1, "check")`` -> ``1 check``; ``plural(0, "check")`` -> ``0 checks``;
    ``plural(3, "entry", "entries")`` -> ``3 entries``; ``plural(1234, "key", spec=",")`` ->
    ``1,234 keys``.

    Args:
        count: how many.
        word: the singular form.
        many: the plural form when it is not ``word + "s"``.
        spec: a format spec for the count (``","`` for thousands separators).

    Returns:
        The phrase.
    """
    return f"{count:{spec}} {word if count == 1 else many or word + 's'}"
