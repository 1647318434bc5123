"""The randomized SVD path of ``lowrank``: chosen only for small rank budgets, error within
tolerance of the exact truncated SVD, deterministic."""

from __future__ import annotations

import pytest
import torch

from graftbuild.compress.codecs import parse_spec
from graftbuild.compress.codecs._common import (
    RANDOMIZED_MIN_RATIO,
    RANDOMIZED_TOLERANCE,
    randomized_svd,
    svd,
    use_randomized,
)


def spectrum_kinds(m: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(m, 6, generator=g) @ torch.randn(6, n, generator=g)
    decay = torch.linalg.qr(torch.randn(m, m, generator=g)).Q[:, : min(m, n)]
    s = 0.9 ** torch.arange(min(m, n), dtype=torch.float32)
    decaying = (decay * s) @ torch.linalg.qr(torch.randn(n, n, generator=g)).Q[:, : min(m, n)].T
    return {
        "flat": torch.randn(m, n, generator=g),  # pure noise: the hardest case for a sketch
        "low rank + noise": low + 0.1 * torch.randn(m, n, generator=g),
        "decaying": decaying,
    }


def best_error(x: torch.Tensor, k: int) -> float:
    u, s, vh = svd(x)
    return float(torch.linalg.norm(x - (u[:, :k] * s[:k]) @ vh[:k]))


@pytest.mark.parametrize(("m", "n"), [(96, 160), (160, 96)])
@pytest.mark.parametrize("seed", [0, 1])
def test_error_within_tolerance_of_the_exact_svd(m: int, n: int, seed: int) -> None:
    for kind, x in spectrum_kinds(m, n, seed).items():
        for k in (1, 4, min(m, n) // RANDOMIZED_MIN_RATIO):
            u, s, vh = randomized_svd(x, k)
            assert u.shape == (m, k) and s.shape == (k,) and vh.shape == (k, n)
            err = float(torch.linalg.norm(x - (u * s) @ vh))
            assert err <= RANDOMIZED_TOLERANCE * best_error(x, k) + 1e-6, (kind, k)


def test_chosen_only_when_the_budget_is_small() -> None:
    k = 1024 // RANDOMIZED_MIN_RATIO
    assert use_randomized((1024, 4096), k)
    assert not use_randomized((1024, 4096), k + 1)
    assert not use_randomized((4096,), 1)


def encode(spec: dict, x: torch.Tensor):
    codec, params = parse_spec(spec)
    return codec.encode(x, params)


def test_codec_uses_it_deterministically_and_reports_energy() -> None:
    x = spectrum_kinds(128, 192, 3)["low rank + noise"]
    a, b = encode({"method": "lowrank", "rank": 8}, x), encode({"method": "lowrank", "rank": 8}, x)
    assert all(torch.equal(a.parts[p], b.parts[p]) for p in a.parts)
    assert a.meta["rank"] == 8
    # energy selection inside a small cap: the total energy comes from the Frobenius norm
    capped = encode({"method": "lowrank", "energy": 0.5, "max_rank": 16}, x)
    _, s, _ = svd(x)
    want = int((torch.cumsum(s.double() ** 2, 0) < 0.5 * (s.double() ** 2).sum()).sum()) + 1
    assert capped.meta["rank"] == want
    full = encode({"method": "lowrank", "energy": 0.5}, x)  # no cap: the exact SVD
    assert full.meta["rank"] == want
    assert capped.meta["energy_kept"] == pytest.approx(full.meta["energy_kept"], abs=1e-4)
