"""seqpar.nn layers load torch.nn state_dicts unchanged and return the same outputs and gradients."""
import itertools

import pytest
import torch
from torch import nn

import seqpar.nn as snn
from conftest import dtype_tol

PAIRS = {"GRU": (nn.GRU, snn.GRU), "LSTM": (nn.LSTM, snn.LSTM), "RNN": (nn.RNN, snn.RNN)}


def build(kind, dtype=torch.float64, **kw):
    tcls, scls = PAIRS[kind]
    ref = tcls(3, 5, **kw).to(dtype)
    mine = scls(3, 5, **kw).to(dtype)
    mine.load_state_dict(ref.state_dict())  # unchanged torch state_dict
    return ref, mine


def flat(h):
    return torch.cat([t.reshape(-1) for t in h]) if isinstance(h, tuple) else h.reshape(-1)


def make_hx(kind, n, B, dtype, batched=True):
    shape = (n, B, 5) if batched else (n, 5)
    if kind == "LSTM":
        return tuple(torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(2))
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def compare(kind, T, B, batch_first, num_layers, bias, dtype=torch.float64, atol=1e-10, with_hx=True):
    ref, mine = build(kind, dtype, num_layers=num_layers, bias=bias, batch_first=batch_first)
    shape = (B, T, 3) if batch_first else (T, B, 3)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    hx = make_hx(kind, num_layers, B, dtype) if with_hx else None
    o1, h1 = ref(x, hx)
    o2, h2 = mine(x, hx)
    scale = max(1.0, o1.abs().max().item())
    assert (o1 - o2).abs().max().item() <= atol * scale
    assert (flat(h1) - flat(h2)).abs().max().item() <= atol * scale
    assert all(info.converged for info in mine.last_info)
    wo, wh = torch.randn_like(o1), torch.randn_like(flat(h1))
    inputs = [x] + (list(hx) if isinstance(hx, tuple) else [hx] if hx is not None else [])
    g1 = torch.autograd.grad((o1 * wo).sum() + (flat(h1) * wh).sum(), inputs + list(ref.parameters()))
    g2 = torch.autograd.grad((o2 * wo).sum() + (flat(h2) * wh).sum(), inputs + list(mine.parameters()))
    names = ["input"] + ["hx"] * (len(inputs) - 1) + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, g1, g2):
        gscale = max(1.0, a.abs().max().item())
        assert (a - b).abs().max().item() <= 10 * atol * gscale, name


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("T,B,batch_first,num_layers,bias",
                         list(itertools.product([1, 7, 1000], [1, 3], [False, True], [1, 2], [True, False])))
def test_matches_torch_float64(kind, T, B, batch_first, num_layers, bias):
    compare(kind, T, B, batch_first, num_layers, bias, with_hx=(T != 7))


@pytest.mark.parametrize("kind", list(PAIRS))
def test_matches_torch_long_float64(kind):
    compare(kind, 20011, 3, False, 2, True)


@pytest.mark.parametrize("kind", list(PAIRS))
def test_matches_torch_long_float32(kind):
    T = 20011
    compare(kind, T, 3, True, 2, True, dtype=torch.float32, atol=dtype_tol(torch.float32, T))


@pytest.mark.parametrize("kind", list(PAIRS))
def test_state_dict_keys_are_torch_names(kind):
    ref, mine = build(kind, num_layers=2, bidirectional=True, bias=False)
    assert list(mine.state_dict()) == list(ref.state_dict())
    ref2 = PAIRS[kind][0](3, 5, num_layers=2, bidirectional=True, bias=False).double()
    ref2.load_state_dict(mine.state_dict())  # and back


@pytest.mark.parametrize("kind", list(PAIRS))
def test_bidirectional_and_unbatched(kind):
    ref, mine = build(kind, num_layers=2, bidirectional=True)
    x = torch.randn(40, 3, dtype=torch.float64)  # unbatched (L, H_in)
    hx = make_hx(kind, 4, None, torch.float64, batched=False)
    o1, h1 = ref(x, hx)
    o2, h2 = mine(x, hx)
    assert o2.shape == o1.shape and torch.allclose(o1, o2, atol=1e-10)
    assert torch.allclose(flat(h1), flat(h2), atol=1e-10)


def test_rnn_relu_and_dropout_eval():
    ref, mine = build("RNN", nonlinearity="relu", num_layers=2, dropout=0.3)
    ref.eval(), mine.eval()
    x = torch.randn(30, 2, 3, dtype=torch.float64)
    assert torch.allclose(ref(x)[0], mine(x)[0], atol=1e-10)


def test_dropout_training_is_applied_between_layers():
    _, mine = build("GRU", num_layers=2, dropout=0.5)
    mine.train()
    x = torch.randn(30, 2, 3, dtype=torch.float64)
    torch.manual_seed(0)
    a = mine(x)[0]
    torch.manual_seed(1)
    b = mine(x)[0]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("layer,H", [(snn.DiagGRU, 5), (snn.DiagLSTM, 5)])
def test_diag_layers_match_sequential_method(layer, H):
    m = layer(3, H, num_layers=2, batch_first=True).double()
    seq = layer(3, H, num_layers=2, batch_first=True, method="sequential").double()
    seq.load_state_dict(m.state_dict())
    assert m.weight_hh_l0.shape == ((3 if layer is snn.DiagGRU else 4) * H,)
    x = torch.randn(2, 500, 3, dtype=torch.float64, requires_grad=True)
    o1, h1 = m(x)
    o2, h2 = seq(x)
    assert torch.allclose(o1, o2, atol=1e-10) and torch.allclose(flat(h1), flat(h2), atol=1e-10)
    g1 = torch.autograd.grad(o1.square().sum(), [x, *m.parameters()])
    g2 = torch.autograd.grad(o2.square().sum(), [x, *seq.parameters()])
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-9)


def test_layer_errors():
    with pytest.raises(ValueError, match="proj_size"):
        snn.LSTM(3, 5, proj_size=2)
    m = snn.GRU(3, 5, num_layers=2)
    with pytest.raises(ValueError, match=r"hx must have shape \(num_layers \* num_directions, B, hidden_size\)"):
        m(torch.randn(4, 2, 3), torch.zeros(1, 2, 5))
    with pytest.raises(ValueError, match="input must be 2-D"):
        m(torch.randn(4))
    with pytest.raises(ValueError, match="hx for an LSTM must be a tuple"):
        snn.LSTM(3, 5)(torch.randn(4, 2, 3), torch.zeros(1, 2, 5))
