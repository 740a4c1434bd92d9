"""``Config``: a configuration handle built from a preset and overrides (SPEC §4–§5)."""

from __future__ import annotations

import ctypes
import json
import keyword
from ctypes import c_size_t, c_void_p
from typing import Any

from . import _lib
from ._errors import BufferTooSmallError

PRESETS = ("paper", "reference", "grpo", "authors")


def _json_key(key: str) -> str:
    """``lambda_`` → ``lambda``: Python keywords cannot be keyword arguments."""
    return key[:-1] if key.endswith("_") and keyword.iskeyword(key[:-1]) else key


class Config:
    """A CalibRL configuration, validated by the library.

    Keys are the library's JSON keys, e.g. ``Config("paper", lambda_=0.2, alpha=0.3,
    agg="seq-mean-token-sum")``; a key that is a Python keyword takes a trailing underscore
    (``lambda_`` for ``lambda``, as ``**{"lambda": 0.2}`` does). Unknown keys, wrong types and
    out-of-range values raise :class:`calibrl.ConfigError` naming the key (with the nearest known
    key for a typo).
    """

    def __init__(self, preset: str = "paper", **overrides: Any) -> None:
        self._handle = None
        text = json.dumps({"preset": preset, **{_json_key(k): v for k, v in overrides.items()}})
        handle = c_void_p()
        _lib.call("calibrl_config_new", text.encode(), ctypes.byref(handle))
        self._handle = handle
        self._free = _lib.function("calibrl_config_free")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        d = dict(d)
        return cls(d.pop("preset", "paper"), **d)

    @classmethod
    def coerce(cls, cfg: Any) -> "Config":
        """A ``Config`` from a ``Config``, a dict of keys (with optional ``preset``), a preset
        name, or ``None`` (the ``paper`` preset)."""
        if isinstance(cfg, Config):
            return cfg
        if cfg is None:
            return cls()
        if isinstance(cfg, str):
            return cls(cfg)
        return cls.from_dict(cfg)

    @property
    def handle(self) -> c_void_p:
        return self._handle

    def to_dict(self) -> dict:
        """Every key with its value (the full configuration, presets resolved)."""
        length = c_size_t()
        buf = ctypes.create_string_buffer(4096)
        try:
            _lib.call("calibrl_config_to_json", self._handle, buf, len(buf), ctypes.byref(length))
        except BufferTooSmallError:
            buf = ctypes.create_string_buffer(length.value + 1)
            _lib.call("calibrl_config_to_json", self._handle, buf, len(buf), ctypes.byref(length))
        return json.loads(buf.value.decode())

    def replace(self, **overrides) -> "Config":
        """A new configuration with some keys changed."""
        return Config.from_dict({**self.to_dict(), **overrides})

    def __getitem__(self, key: str):
        return self.to_dict()[key]

    def __repr__(self) -> str:
        return f"Config({self.to_dict()})"

    def __del__(self):
        handle = getattr(self, "_handle", None)
        if handle is not None and handle.value:
            self._free(handle)
            self._handle = None
