"""Affine-map algebra and the pure-PyTorch scans against step-by-step loops."""
import pytest
import torch

from seqpar.scan import affine_reduce, affine_scan, chunked_scan, sequential_scan
from seqpar.structure import Structure, parse_structure

STRUCTS = [Structure("diag"), Structure("block", 2), Structure("block", 3), Structure("dense")]


def random_maps(st, n, B, D, dtype=torch.float64):
    J = torch.randn(*st.jac_shape((n, B), D), dtype=dtype) * 0.5
    b = torch.randn(n, B, D, dtype=dtype)
    return J, b


@pytest.mark.parametrize("st", STRUCTS, ids=lambda s: s.describe())
@pytest.mark.parametrize("n", [1, 2, 7, 33, 100, 129])
@pytest.mark.parametrize("B", [1, 3])
def test_affine_scan_matches_loop(st, n, B):
    D = 6
    J, b = random_maps(st, n, B, D)
    h_in = torch.randn(B, D, dtype=torch.float64)
    ref = sequential_scan(J, b, h_in, st)
    assert torch.allclose(affine_scan(J, b, h_in, st), ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("st", STRUCTS, ids=lambda s: s.describe())
@pytest.mark.parametrize("n,sub", [(1, 1), (64, 0), (65, 0), (100, 7), (257, 16), (300, 300)])
def test_two_level_scan_matches_loop(st, n, sub):
    from seqpar.scan import two_level_scan

    B, D = 2, 6
    J, b = random_maps(st, n, B, D)
    h_in = torch.randn(B, D, dtype=torch.float64)
    ref = sequential_scan(J, b, h_in, st)
    assert torch.allclose(two_level_scan(J, b, h_in, st, sub), ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("st", STRUCTS, ids=lambda s: s.describe())
@pytest.mark.parametrize("n", [1, 5, 64, 77])
def test_reduce_is_composition(st, n):
    B, D = 2, 6
    J, b = random_maps(st, n, B, D)
    A, c = affine_reduce(J, b, st)
    h_in = torch.randn(B, D, dtype=torch.float64)
    ref = sequential_scan(J, b, h_in, st)[-1]
    assert torch.allclose(st.matvec(A, h_in) + c, ref, atol=1e-10)


@pytest.mark.parametrize("st", STRUCTS, ids=lambda s: s.describe())
@pytest.mark.parametrize("chunk", [1, 4, 13, 1000])
def test_chunked_scan_and_reduce(st, chunk):
    n, B, D = 50, 2, 6
    J, b = random_maps(st, n, B, D)
    h_in = torch.randn(B, D, dtype=torch.float64)
    calls = []

    def fn(s, e):
        calls.append((s, e))
        assert e - s <= chunk
        return J[s:e], b[s:e]

    ref = sequential_scan(J, b, h_in, st)
    assert torch.allclose(chunked_scan(fn, n, h_in, st, chunk)[0], ref, atol=1e-10)
    A, c = affine_reduce(J, b, st)  # the whole block's summary (reference for the chunked product)
    assert torch.allclose(st.matvec(A, h_in) + c, ref[-1], atol=1e-10)
    states, phi = chunked_scan(fn, n, h_in, st, chunk, product=True)
    # the product is the summary's linear part: the map from h_in to the last state
    assert torch.allclose(phi, A, atol=1e-10)
    assert torch.allclose(st.matvec(phi, h_in) + chunked_scan(fn, n, torch.zeros_like(h_in), st, chunk)[0][-1],
                          states[-1], atol=1e-10)


@pytest.mark.parametrize("st", STRUCTS, ids=lambda s: s.describe())
def test_structure_ops_match_dense(st):
    B, D = 3, 6
    J2 = torch.randn(*st.jac_shape((B,), D), dtype=torch.float64)
    J1 = torch.randn(*st.jac_shape((B,), D), dtype=torch.float64)
    x = torch.randn(B, D, dtype=torch.float64)
    d2, d1 = st.to_dense(J2, D), st.to_dense(J1, D)
    assert torch.allclose(st.to_dense(st.matmul(J2, J1), D), d2 @ d1)
    assert torch.allclose(st.matvec(J2, x), (d2 @ x.unsqueeze(-1)).squeeze(-1))
    assert torch.allclose(st.to_dense(st.transpose(J2), D), d2.transpose(-1, -2))
    assert torch.allclose(st.from_dense(d2), J2)
    assert torch.allclose(st.to_dense(st.identity((B,), D, torch.float64, "cpu"), D), torch.eye(D).expand(B, D, D).double())


def test_parse_structure():
    assert parse_structure("block:4") == Structure("block", 4)
    assert parse_structure(("block", 3)) == Structure("block", 3)
    assert parse_structure("dense").kind == "dense"
    with pytest.raises(ValueError, match="structure"):
        parse_structure("tridiagonal")
    with pytest.raises(ValueError, match="multiple of the block size"):
        Structure("block", 4).jac_shape((1,), 6)
