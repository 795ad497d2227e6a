"""Low-VRAM residency: weights visit the compute device only while a request runs."""

import pytest
import torch
from torch import nn

from lowvox.runtime.residency import Residency


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 8),
        nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)),
        nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)),
        nn.Linear(8, 2),
    ).eval()


def tensors(m: nn.Module) -> list[torch.Tensor]:
    return [*m.parameters(), *m.buffers()]


def test_weights_move_for_a_request_and_come_back():
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    r = Residency(m, storage="cpu", compute="meta")  # meta: a "device" the CPU can check
    assert all(t.device.type == "cpu" for t in tensors(m))
    with r.active():
        assert all(t.device.type == "meta" for t in tensors(m))
        assert r.busy
    assert not r.busy
    assert all(t.device.type == "cpu" for t in tensors(m))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert r.moves == len(tensors(m))


def test_nested_requests_move_once():
    m = model()
    r = Residency(m, "cpu", "meta")
    with r.active():
        with r.active():
            pass
        assert all(t.device.type == "meta" for t in tensors(m))  # still inside the outer one
    assert r.moves == len(tensors(m))
    assert all(t.device.type == "cpu" for t in tensors(m))


def test_a_failed_request_still_returns_the_weights():
    m = model()
    r = Residency(m, "cpu", "meta")
    with pytest.raises(RuntimeError), r.active():
        raise RuntimeError("boom")
    assert all(t.device.type == "cpu" for t in tensors(m)) and not r.busy


def test_layer_by_layer_moves_each_layer_per_forward_and_computes_the_same():
    m = model()
    x = torch.randn(4, 8)
    expected = m(x)
    layers = [m[1], m[2]]
    r = Residency(m, "cpu", "cpu", granularity="layer", layers=layers)
    per_layer = sum(len(tensors(layer)) for layer in layers)
    rest = len(tensors(m)) - per_layer
    with r.active():
        assert r.moves == rest  # only the non-layer modules moved for the request
        assert torch.equal(m(x), expected)
        assert r.moves == rest + per_layer
        m(x)
        assert r.moves == rest + 2 * per_layer  # every forward brings each layer again
    m(x)  # outside a request the hooks do nothing
    assert r.moves == rest + 2 * per_layer


def test_granularity_switch_and_errors():
    m = model()
    r = Residency(m, "cpu", "cpu", layers=[m[1]])
    assert r.granularity == "request"
    r.set_granularity("layer")
    with r.active(), pytest.raises(RuntimeError):
        r.set_granularity("request")
    r.set_granularity("request")
    with pytest.raises(ValueError):
        r.set_granularity("weights")
    with pytest.raises(ValueError):
        Residency(model(), "cpu", "cpu", granularity="layer")  # no layers given


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_memory_is_freed_between_requests():
    m = model()
    x = torch.randn(4, 8, device="cuda")
    r = Residency(m, "cpu", "cuda")
    assert all(t.is_pinned() for t in tensors(m))
    base = torch.cuda.memory_allocated()
    with r.active():
        assert m(x).device.type == "cuda"
        assert torch.cuda.memory_allocated() > base
    assert torch.cuda.memory_allocated() == base


def test_out_of_memory_falls_back_to_layer_by_layer(monkeypatch):
    m = model()
    x = torch.randn(4, 8)
    expected = m(x)
    r = Residency(m, "cpu", "cpu", layers=[m[1], m[2]])
    real = r._place

    def place(modules, device):
        # A "GPU" that holds at most three modules' weights at once: not the whole model
        # (9 modules), but the non-layer rest (3) and then one layer (3) at a time.
        if device is not None and len(modules) > 3:
            raise torch.OutOfMemoryError("pretend the GPU is full")
        real(modules, device)

    monkeypatch.setattr(r, "_place", place)
    with r.active():
        assert r.granularity == "layer"
        assert torch.equal(m(x), expected)
    assert r.granularity == "layer" and not r.busy


def test_out_of_memory_in_layer_mode_is_raised(monkeypatch):
    m = model()
    r = Residency(m, "cpu", "cpu", granularity="layer", layers=[m[1]])

    def place(modules, device):
        if device is not None:
            raise torch.OutOfMemoryError("pretend the GPU is full")

    monkeypatch.setattr(r, "_place", place)
    with pytest.raises(torch.OutOfMemoryError), r.active():
        pass
    assert not r.busy
