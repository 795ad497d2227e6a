"""The quantised-weights cache: a standard safetensors file, read back aligned and checked."""

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowvox.runtime.qcache import quantized_cache_path, read_quantized, write_quantized

META = {"precision": "int8", "mode": "m1", "source_size": "10", "sha256": "abc"}


def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randint(-127, 128, (7, 5), dtype=torch.int8, generator=g),
        "scales": torch.rand(7, generator=g).to(torch.bfloat16),
        "bias": torch.randn(7, generator=g),
        "steps": torch.tensor(3),
        "empty": torch.zeros(0, 4),
    }


def test_roundtrip_keeps_values_dtypes_and_alignment(tmp_path):
    path = tmp_path / "m.int8.lowvox.safetensors"
    write_quantized(path, state(), META)
    got = read_quantized(path, {"precision": "int8", "mode": "m1"})
    assert got is not None and got.metadata == META
    for key, value in state().items():
        assert got.state_dict[key].dtype == value.dtype
        assert torch.equal(got.state_dict[key], value), key
        assert got.state_dict[key].data_ptr() % 64 == 0 or value.numel() == 0


def test_files_are_standard_safetensors_both_ways(tmp_path):
    ours = tmp_path / "ours.safetensors"
    write_quantized(ours, state(), META)
    with safe_open(str(ours), framework="pt") as f:
        assert f.metadata() == META
        assert torch.equal(f.get_tensor("w"), state()["w"])
    theirs = tmp_path / "theirs.safetensors"
    save_file(state(), str(theirs), metadata=META)
    got = read_quantized(theirs, {"mode": "m1"})
    assert got is not None and torch.equal(got.state_dict["scales"], state()["scales"])


def test_stale_missing_or_damaged_caches_are_not_used(tmp_path):
    path = tmp_path / "c.safetensors"
    assert read_quantized(path, {}) is None  # absent
    assert read_quantized(None, {}) is None  # no cache location at all
    write_quantized(path, state(), META)
    assert read_quantized(path, {"mode": "m2"}) is None  # another quantisation mode
    assert read_quantized(path, {"source_size": "11"}) is None  # the source changed
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 20])  # truncated
    assert read_quantized(path, {"mode": "m1"}) is None
    path.write_bytes(b"\xff" * 64)  # garbage
    assert read_quantized(path, {}) is None


def test_no_sha_means_stale(tmp_path):
    path = tmp_path / "c.safetensors"
    write_quantized(path, state(), {"mode": "m1"})
    assert read_quantized(path, {"mode": "m1"}) is None


def test_cache_path_names_the_precision(tmp_path):
    base = tmp_path / "model-0123.lowvox.safetensors"
    assert quantized_cache_path(base, "int8").name == "model-0123.int8.lowvox.safetensors"
    assert quantized_cache_path(None, "int8") is None


def test_int8_weights_share_one_huge_page_buffer(tmp_path):
    """Every int8 tensor lands in one 2 MB-aligned buffer (huge pages for the weights that
    decoding streams), each 64-byte aligned; other dtypes get their own allocations."""
    g = torch.Generator().manual_seed(1)
    big = {
        f"layer{i}.weight": torch.randint(
            -127, 128, (1000 + i, 1100), dtype=torch.int8, generator=g
        )
        for i in range(3)
    }
    big["layer0.scales"] = torch.rand(1000).to(torch.bfloat16)
    path = tmp_path / "big.int8.lowvox.safetensors"
    write_quantized(path, big, META)
    got = read_quantized(path, {"precision": "int8"})
    assert got is not None
    int8 = [got.state_dict[f"layer{i}.weight"] for i in range(3)]
    storages = {t.untyped_storage().data_ptr() for t in int8}
    assert len(storages) == 1
    assert min(t.data_ptr() for t in int8) % (2 * 1024 * 1024) == 0
    for i, t in enumerate(int8):
        assert t.data_ptr() % 64 == 0 and torch.equal(t, big[f"layer{i}.weight"])
    scales = got.state_dict["layer0.scales"]
    assert scales.untyped_storage().data_ptr() not in storages
    assert torch.equal(scales, big["layer0.scales"])


def test_int8_weights_can_be_read_as_panels(tmp_path):
    """`panels=True`: each 2-D int8 weight comes back packed (`kernels.pack_int8_panels` of
    the stored rows), all in one buffer, its state-dict entry a stand-in of its shape and
    dtype without memory; the other tensors as stored."""
    import pytest

    from lowvox.runtime import kernels

    if not kernels.available() or not kernels.int8_panels():
        pytest.skip("this build packs no int8 panels (AVX-512 VNNI without AMX only)")
    path = tmp_path / "p.int8.lowvox.safetensors"
    tensors = {**state(), "w2": torch.randint(-127, 128, (40, 100), dtype=torch.int8)}
    write_quantized(path, tensors, META)
    got = read_quantized(path, {"mode": "m1"}, panels=True)
    assert got is not None and sorted(got.panels) == ["w", "w2"]
    for name in ("w", "w2"):
        packed = got.panels[name]
        assert torch.equal(packed, kernels.pack_int8_panels(tensors[name])), name
        assert packed.data_ptr() % 64 == 0
        assert torch.equal(kernels.unpack_int8_panels(packed, *tensors[name].shape), tensors[name])
        stand_in = got.state_dict[name]
        assert stand_in.shape == tensors[name].shape and stand_in.dtype == torch.int8
        assert stand_in.untyped_storage().nbytes() == 1
    storages = {p.untyped_storage().data_ptr() for p in got.panels.values()}
    assert len(storages) == 1
    for name in ("scales", "bias", "steps"):
        assert torch.equal(got.state_dict[name], tensors[name]), name
