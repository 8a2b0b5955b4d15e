"""The shared-memory pool: page-aligned regions, views that hold their region until the last one
is gone, bounds, and the sweep of files whose creator died."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest
import torch

from shared.wire.shm import (
    PAGE,
    PREFIX,
    SHM_DIR,
    RegionPool,
    ShmError,
    map_file,
    new_pool_path,
    sweep_stale,
    write_region,
)


@pytest.fixture
def pool():
    path = new_pool_path()
    mapping = map_file(path, 8 * PAGE, create=True)
    other = map_file(path, 8 * PAGE, create=False)  # the encode side's mapping
    path.unlink()
    yield RegionPool(mapping, 8 * PAGE), other


def test_a_view_shows_what_the_other_mapping_wrote_and_holds_its_region(pool):
    regions, other = pool
    tensor = torch.randn(20, 7).to(torch.bfloat16)
    nbytes = tensor.numel() * 2
    offset = regions.allocate(nbytes)
    assert offset == 0 and regions.free_bytes == 7 * PAGE
    assert write_region(other, offset, tensor) == nbytes
    view = regions.view(offset, nbytes, torch.bfloat16, tensor.shape)
    assert torch.equal(view, tensor)
    halves = view.split(10)
    del view
    gc.collect()
    assert regions.num_live == 1  # the slices still read the region
    del halves
    gc.collect()
    assert regions.num_live == 0 and regions.free_bytes == 8 * PAGE


def test_regions_are_first_fit_and_coalesce(pool):
    regions, _ = pool
    a, b, c = (regions.allocate(PAGE) for _ in range(3))
    assert (a, b, c) == (0, PAGE, 2 * PAGE)
    assert regions.allocate(6 * PAGE) is None  # 5 pages left
    regions.release(b, PAGE)
    assert regions.allocate(2 * PAGE) == 3 * PAGE  # the freed page is too small
    regions.release(a, PAGE)
    regions.release(c, PAGE)
    assert regions.allocate(3 * PAGE) == 0  # a, b and c merged again


def test_a_region_shrunk_to_what_was_written_gives_its_tail_back(pool):
    regions, _ = pool
    offset = regions.allocate(4 * PAGE)
    regions.shrink(offset, 4 * PAGE, PAGE + 1)  # two pages used
    assert regions.free_bytes == 6 * PAGE and regions.allocate(2 * PAGE) == 2 * PAGE
    regions.release(offset, PAGE + 1)
    assert regions.num_live == 1 and regions.free_bytes == 6 * PAGE


def test_a_write_outside_the_pool_is_refused(pool):
    _, other = pool
    with pytest.raises(ShmError, match="outside"):
        write_region(other, 7 * PAGE, torch.zeros(2 * PAGE, dtype=torch.uint8))


def test_the_sweep_removes_files_of_dead_creators_only():
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = SHM_DIR / f"{PREFIX}{int(dead.stdout)}-abc123"
    live = new_pool_path()
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    try:
        assert stale in sweep_stale()
        assert not stale.exists() and live.exists()
    finally:
        stale.unlink(missing_ok=True)
        live.unlink(missing_ok=True)
