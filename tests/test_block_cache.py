"""The training block cache: large blocks reused by size class inside the context, torch's allocator outside it."""

import gc

import pytest
import torch

import effspec.block_cache as bc
from effspec.block_cache import block_cache, stats


@pytest.fixture(autouse=True)
def cache_built():
    if not bc.available():
        pytest.skip("no C++ toolchain: the block cache is off")
    gc.collect()  # earlier tests' garbage dies now, not while a test counts blocks


def test_a_freed_block_serves_the_next_request_of_its_class():
    start = stats()["live_blocks"]  # blocks of earlier tests' tensors that are still alive
    with block_cache() as on:
        assert on
        before = stats()
        a = torch.full((1_000_000 // 4,), 3.0)  # 1,000,000 bytes -> class 1 MiB (eighths of 2^19 above 2^19)
        assert stats()["live_bytes"] - before["live_bytes"] == 1 << 20
        del a
        assert stats()["idle_bytes"] >= 1 << 20
        b = torch.arange(1_040_000 // 4, dtype=torch.float32)  # another size, the same class: the same block
        assert stats()["reuses"] == before["reuses"] + 1
        assert torch.equal(b[-3:], torch.tensor([259997.0, 259998.0, 259999.0]))
        small = torch.zeros(1000)  # below MIN_BYTES: torch's default allocator
        assert stats()["live_blocks"] == before["live_blocks"] + 1
        del small
    assert stats()["idle_bytes"] == 0  # idle blocks are unmapped on leaving
    assert stats()["live_blocks"] == start + 1  # b outlives the context ...
    b.add_(1)
    assert float(b[0]) == 1.0
    del b
    assert stats()["live_blocks"] == start  # ... and is unmapped when it dies
    c = torch.ones(1 << 20)  # outside the context: torch's allocator again
    assert stats()["live_blocks"] == start
    del c


def test_nested_contexts_switch_allocators_once():
    start = stats()["live_blocks"]
    with block_cache():
        with block_cache() as inner:
            assert inner
        x = torch.ones(1 << 18)  # the outer context still serves blocks
        assert stats()["live_blocks"] == start + 1
        del x
    after = stats()
    assert after["live_blocks"] == start and after["idle_bytes"] == 0


def test_training_with_the_cache_matches_training_without(monkeypatch):
    from test_tune import config, ids, tiny

    from effspec.steps.tune.lora import train_adapter

    def losses():
        torch.manual_seed(0)
        _, log = train_adapter(tiny().model, config("lora", steps=3, batch_size=2, lr=1e-2), ids())
        return log.losses

    monkeypatch.setattr(bc, "MIN_BYTES", 4096)  # the tiny model's tensors are small: let the cache take them
    reuses = stats()["reuses"]
    cached = losses()
    assert stats()["reuses"] > reuses  # the loop's tensors did come from the cache
    monkeypatch.setattr(bc, "_module", lambda: None)
    assert losses() == cached


def test_the_variable_turns_the_cache_off():
    import os
    import subprocess
    import sys

    probe = "from effspec.block_cache import block_cache\nwith block_cache() as on: print(on)"
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "EFFSPEC_BLOCK_CACHE": "0"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_idle_blocks_stay_within_twice_the_live_peak():
    with block_cache():
        grown = 0
        for step in range(40):  # a tensor that grows by concatenation, as a KV cache does
            x = torch.ones(65536 + 8192 * step)  # 256 KiB, then every 32 KiB more: a new size class every few steps
            grown += x.numel() * 4
            del x
        held = stats()
        assert held["reuses"] > 0  # steps within a class reuse the block the previous step freed
        assert held["live_peak"] >= 4 * (65536 + 8192 * 39)
        assert held["idle_bytes"] <= 2 * held["live_peak"] < grown  # unbounded, every class's block would stay
