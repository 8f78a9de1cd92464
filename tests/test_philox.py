"""Philox4x32-10: the vectorised torch implementation against a scalar transcription of the published
algorithm, the Random123 known-answer vectors, and Triton's own ``tl.rand``."""

import os

import pytest
import torch

from lpc_kernels import philox

M32 = 0xFFFFFFFF

# Random123 tests/kat_vectors, "philox4x32 10": counter[4], key[2] -> output[4]
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def scalar_philox4x32_10(ctr, key):
    """Plain transcription of Random123's philox4x32_R(10, ctr, key): bump the key before rounds 2..10."""
    m0, m1 = 0xD2511F53, 0xCD9E8D57
    w0, w1 = 0x9E3779B9, 0xBB67AE85
    c, k = list(ctr), list(key)
    for r in range(10):
        if r > 0:
            k = [(k[0] + w0) & M32, (k[1] + w1) & M32]
        p0, p1 = m0 * c[0], m1 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k[0]) & M32, p1 & M32, ((p0 >> 32) ^ c[3] ^ k[1]) & M32, p0 & M32]
    return tuple(c)


def scalar_uniform(seed, counter):
    x = scalar_philox4x32_10((counter & M32, counter >> 32, 0, 0), (seed & M32, seed >> 32))[0]
    signed = x - 2**32 if x >= 2**31 else x
    folded = ~signed if signed < 0 else signed
    return (torch.tensor(float(folded), dtype=torch.float32)
            * torch.tensor(philox.UNIFORM_SCALE, dtype=torch.float32)).item()


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_scalar_transcription_known_answers(ctr, key, expected):
    assert scalar_philox4x32_10(ctr, key) == expected


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_vectorised_known_answers(ctr, key, expected):
    words = [torch.tensor([c], dtype=torch.int64) for c in ctr]
    out = philox.philox4x32(*words, key[0], key[1])
    assert tuple(int(w) for w in out) == expected


def test_vectorised_matches_scalar_on_random_counters_and_seeds():
    gen = torch.Generator().manual_seed(1)
    counters = torch.randint(0, 2**62, (64,), generator=gen)
    counters[:4] = torch.tensor([0, 1, 2**32 - 1, 2**32])  # around the low/high word boundary
    for seed in (0, 1, 2**32 - 1, 2**32 + 7, 2**63 - 1):
        ours = philox.philox_uniform(seed, counters)
        expected = torch.tensor([scalar_uniform(seed, int(c)) for c in counters], dtype=torch.float32)
        assert torch.equal(ours, expected), seed


def test_uniform_mapping_edges():
    words = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.int64)
    u = philox.uint32_to_uniform(words)
    assert u.dtype == torch.float32
    assert u[0] == 0 and u[4] == 0  # 0xffffffff is int32 -1, folded to 0
    assert u[2] == u[3] and u[2] < 1.0  # 2**31 is int32 min, folded to int32 max


def test_gumbel_noise_finite_and_layout():
    g = philox.gumbel_noise(5, 100, 3, 7)
    assert g.shape == (3, 7) and torch.isfinite(g).all()
    u = philox.philox_uniform(5, torch.arange(100, 121))
    assert torch.equal(g.flatten(), philox.gumbel_from_uniform(u))


def test_seed_range_checked():
    with pytest.raises(ValueError, match="seed"):
        philox.philox_uniform(-1, torch.arange(3))
    with pytest.raises(TypeError, match="seed"):
        philox.philox_uniform(1.5, torch.arange(3))


@pytest.mark.triton
def test_matches_triton_tl_rand():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def _rand_kernel(out_ptr, seed, offset, n, BLOCK: tl.constexpr):
        idx = tl.arange(0, BLOCK)
        counters = offset + idx.to(tl.int64)
        tl.store(out_ptr + idx, tl.rand(seed, counters), mask=idx < n)

    # natively on a GPU; through the interpreter (TRITON_INTERPRET=1) on CPU tensors
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()
    device = "cpu" if interpreted else "cuda"
    for seed, offset in ((0, 0), (1234, 2**32 - 3), (2**40 + 5, 17)):
        out = torch.empty(16, dtype=torch.float32, device=device)
        _rand_kernel[(1,)](out, seed, offset, 16, BLOCK=16)
        expected = philox.philox_uniform(seed, offset + torch.arange(16))
        assert torch.equal(out.cpu(), expected), (seed, offset)
