"""Compressed KV caches, as transformers `Cache` subclasses (they work in transformers' `generate` too).

    from effspec.kvcache import make_cache
    cache = make_cache("kivi:bits=2", model)          # or QuantizedKVCache(model, bits=2)
    model.generate(ids, past_key_values=cache, ...)   # or effspec.generate(..., cache=cache)
    cache.held_bytes()                                # bytes of key/value state actually held

- `kivi` (QuantizedKVCache): 2/4/8-bit keys per channel, values per token, a full-precision recent window.
- `streaming` (StreamingCache): attention sinks + a recent window; constant memory.
- `h2o` (HeavyHitterCache): keep a fraction of the tokens, the most attended and the most recent.

A spec is `name` or `name:value` (the main parameter: kivi bits, streaming
window, h2o ratio) or `name:key=value,key=value`.
"""

from __future__ import annotations

import inspect

from effspec.errors import UserError
from effspec.kvcache.base import CompressedCache
from effspec.kvcache.heavy_hitter import HeavyHitterCache
from effspec.kvcache.kivi import QuantizedKVCache
from effspec.kvcache.streaming import StreamingCache

CACHES: dict[str, tuple[type[CompressedCache], str]] = {  # name -> (class, the parameter a bare value sets)
    "kivi": (QuantizedKVCache, "bits"),
    "streaming": (StreamingCache, "window"),
    "h2o": (HeavyHitterCache, "ratio"),
}

__all__ = ["CACHES", "CompressedCache", "HeavyHitterCache", "QuantizedKVCache", "StreamingCache", "make_cache",
           "parse_cache_spec"]


def parse_cache_spec(spec: str) -> tuple[type[CompressedCache], dict]:
    """`kivi:bits=2,residual=64` -> (QuantizedKVCache, {"bits": 2, "residual": 64}); a UserError if malformed."""
    name, _, rest = spec.strip().partition(":")
    if name not in CACHES:
        raise UserError(f"unknown KV cache {name!r}; expected one of {', '.join(CACHES)} (e.g. kivi:4, streaming:1024, "
                        "h2o:0.2)")
    cls, main = CACHES[name]
    params = inspect.signature(cls.__init__).parameters
    kwargs = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key, value = (key.strip(), value.strip()) if eq else (main, key.strip())
        if key not in params or key in ("self", "model"):
            options = [p for p in params if p not in ("self", "model")]
            raise UserError(f"KV cache {name}: unknown parameter {key!r}; expected {', '.join(options)}")
        kind = type(params[key].default)
        try:
            kwargs[key] = kind(value)
        except ValueError:
            raise UserError(f"KV cache {name}: {key}={value!r} is not a {kind.__name__}") from None
    return cls, kwargs


def make_cache(spec: str, model) -> CompressedCache:
    """A fresh cache of the kind `spec` names, sized for `model` (one per generation or scored text)."""
    cls, kwargs = parse_cache_spec(spec)
    return cls(model, **kwargs)
