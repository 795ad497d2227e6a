"""Reading part of a weights cache: some tensors left on disk at load, read later from the
same file once it is checked to be the one the model was loaded from."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from lowvox.errors import LowvoxError
from lowvox.runtime.qcache import (
    CacheError,
    read_quantized,
    read_tensors,
    write_quantized,
)

META = {"precision": "int8", "mode": "m1", "source_size": "10", "sha256": "abc"}


def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "gpt.h.0.w": torch.randint(-127, 128, (6, 4), dtype=torch.int8, generator=g),
        "gpt.h.0.scales": torch.rand(6, generator=g).to(torch.bfloat16),
        "gpt.cond.w": torch.randn(5, 3, generator=g),
        "gpt.cond.q": torch.randint(-127, 128, (9,), dtype=torch.int8, generator=g),
        "spk.bn.steps": torch.tensor(4),
        "spk.w": torch.randn(2, 2, generator=g),
        "gpt.condition": torch.randn(3, generator=g),  # shares a prefix, not a module name
    }


LATER = ("gpt.cond.", "spk.")


def test_skipped_tensors_are_left_out_and_read_later_exactly(tmp_path):
    path = tmp_path / "m.safetensors"
    write_quantized(path, state(), META)
    now = read_quantized(path, {"mode": "m1"}, skip=LATER)
    assert now is not None
    assert sorted(now.state_dict) == ["gpt.condition", "gpt.h.0.scales", "gpt.h.0.w"]
    later = read_tensors(path, META, LATER)
    assert sorted(later) == ["gpt.cond.q", "gpt.cond.w", "spk.bn.steps", "spk.w"]
    for key, t in later.items():
        assert t.dtype == state()[key].dtype and torch.equal(t, state()[key]), key
    # int8 tensors read later are aligned too (the fused kernels' requirement).
    assert later["gpt.cond.q"].data_ptr() % 64 == 0


def test_files_written_by_safetensors_itself_are_read_the_same_way(tmp_path):
    path = tmp_path / "float.safetensors"
    save_file(state(), str(path), metadata=META)
    assert torch.equal(read_tensors(path, META, ("spk.",))["spk.w"], state()["spk.w"])


def _rewrite(path, data: bytes) -> None:
    tmp = path.with_name("tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@pytest.mark.parametrize(
    "damage", ["missing", "stale", "truncated", "garbage", "bad-entry", "bad-shape"]
)
def test_a_cache_that_changed_since_the_load_raises_a_clear_error(tmp_path, damage):
    path = tmp_path / "m.safetensors"
    write_quantized(path, state(), META)
    if damage == "missing":
        path.unlink()
    elif damage == "stale":  # rebuilt for another source in the meantime
        write_quantized(path, state(), {**META, "sha256": "def"})
    elif damage == "truncated":  # even where the tensors asked for lie before the cut
        _rewrite(path, path.read_bytes()[:-8])
    elif damage == "garbage":
        _rewrite(path, b"\x00" * 8 + b"{" * 100)
    elif damage == "bad-entry":
        save_file({"spk.w": torch.zeros(2)}, str(path), metadata=META)
        raw = path.read_bytes().replace(b'{"dtype"', b'["dtype"', 1)
        _rewrite(path, raw)
    else:  # as many values as stored, in a shape no tensor can have
        entry = {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}
        header = json.dumps({"__metadata__": META, "spk.w": entry}).encode()
        _rewrite(path, struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(CacheError) as caught:
        read_tensors(path, META, LATER)
    assert isinstance(caught.value, LowvoxError) and str(path) in str(caught.value)
    # The loader, which can rebuild, just does not use such a file.
    assert read_quantized(path, META, skip=LATER) is None


def test_no_tensor_under_the_prefixes_is_an_error(tmp_path):
    path = tmp_path / "m.safetensors"
    write_quantized(path, state(), META)
    with pytest.raises(CacheError, match="holds no tensors"):
        read_tensors(path, META, ("nothing.",))
