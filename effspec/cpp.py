"""Build effspec's inline C++ extensions once per machine, or fall back when that cannot be done.

Each extension (the low-bit kernels, the block cache) is C++ source inside its
Python module, compiled by torch's `load_inline` on first use and cached under
torch's extensions directory. Without a compiler or ninja, or with its switch
variable at 0, the caller gets None and keeps its torch-only path.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

log = logging.getLogger(__name__)


def compile_inline(name: str, decls: str, source: str, functions: Sequence[str], what: str, switch: str,
                   cflags: Sequence[str] = ("-O2",), ldflags: Sequence[str] = ()):
    """The compiled module `name`, or None when `switch`=0 or the build fails (warned once, naming `what`)."""
    if os.environ.get(switch, "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        log.info("effspec: loading the %s (built on first use per machine, about a minute)", what)
        return load_inline(name=name, cpp_sources=[decls, source], functions=list(functions),
                           extra_cflags=list(cflags), extra_ldflags=list(ldflags), verbose=False)
    except Exception as exc:  # no compiler, no ninja, a read-only cache...: the torch-only paths still work
        log.warning("effspec: %s unavailable (%s); %s=0 silences this", what, str(exc).splitlines()[0], switch)
        return None
