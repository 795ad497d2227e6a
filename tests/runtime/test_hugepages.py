"""The huge-page buffer: aligned, sized, usable; small requests are plain allocations."""

from lowvox.runtime.hugepages import HUGE_PAGE, huge_buffer


def test_large_buffers_are_aligned_to_huge_pages_and_writable():
    buf = huge_buffer(3 * HUGE_PAGE + 5)
    assert buf.numel() == 3 * HUGE_PAGE + 5
    assert buf.data_ptr() % HUGE_PAGE == 0
    buf.fill_(7)
    assert int(buf[-1]) == 7 and int(buf.sum()) == 7 * buf.numel()


def test_small_buffers_are_plain():
    buf = huge_buffer(100)
    assert buf.numel() == 100
