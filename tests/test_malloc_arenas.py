"""effspec asks glibc for one malloc arena on import, so memory freed by one thread is reused by the next."""

import os
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, tempfile, threading
import effspec
import torch
torch.set_num_threads(2)
def work():
    for _ in range(10):
        a = torch.randn(256, 2048)
        (a @ a.t()).sum()
threads = [threading.Thread(target=work) for _ in range(3)]
[t.start() for t in threads]
[t.join() for t in threads]
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
path = tempfile.mktemp()
f = ctypes.c_void_p(libc.fopen(path.encode(), b"w"))
libc.malloc_info(0, f)
libc.fclose(f)
print(open(path).read().count("<heap nr="))
"""


def heaps(arenas: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "EFFSPEC_MALLOC_ARENAS"}
    if arenas is not None:
        env["EFFSPEC_MALLOC_ARENAS"] = arenas
    return int(subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux") or "glibc" not in " ".join(__import__("platform").libc_ver()),
                    reason="glibc only")
def test_one_arena_by_default_and_the_variable_turns_it_off():
    assert heaps(None) == 1  # three Python threads and torch's workers allocated, all in one arena
    assert heaps("0") > 1  # glibc's default: an arena per contending thread
