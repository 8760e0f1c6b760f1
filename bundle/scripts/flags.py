"""Boolean flags from bundle configs and the command line.

``python -m monai.bundle run --overwrite false`` passes the *string* ``"false"``, which Python
treats as true; every flag that guards user data must go through :func:`as_bool`.
"""

from __future__ import annotations

from typing import Any

TRUE = ("true", "1", "yes", "on")
FALSE = ("false", "0", "no", "off", "none", "null", "")


def as_bool(value: Any, name: str = "flag") -> bool:
    """``value`` as a bool; strings must be one of the usual spellings of true or false."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in TRUE:
            return True
        if text in FALSE:
            return False
        raise ValueError(f"{name} must be true or false, got {value!r}.")
    return bool(value)
