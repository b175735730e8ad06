"""The sampler: temperature 0 and top_k 1 are greedy; a seeded slot's tokens do not depend on the batch around
it; at temperature 1 the empirical distribution of a tiny model's first token matches its softmax, and top-k /
top-p draw from the kept tokens renormalised (chi-square tests at p = 0.001, fixed seeds: 40000 and 30000
draws)."""

from __future__ import annotations

import torch

from star_mcore.ops.sampling import TOP_LOGPROBS, SamplingParams, sample

V = 101


def _params(n, temperature=1.0, top_k=0, top_p=1.0, seeds=None, counter=0):
    return SamplingParams(torch.full((n,), float(temperature)), torch.full((n,), top_k, dtype=torch.long),
                          torch.full((n,), float(top_p)),
                          torch.arange(n, dtype=torch.long) if seeds is None else torch.as_tensor(seeds),
                          torch.full((n,), counter, dtype=torch.long))


def _logits(n, seed=0, scale=2.0):
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * scale


def test_temperature_zero_and_top_k_one_are_greedy():
    logits = _logits(64)
    for p in (_params(64, temperature=0.0), _params(64, temperature=0.7, top_k=1)):
        token, lp, top_ids, top_lp = sample(logits, p)
        assert torch.equal(token, logits.argmax(-1))
    assert top_ids.shape == (64, TOP_LOGPROBS)
    logp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(lp, logp.gather(1, token[:, None])[:, 0])
    torch.testing.assert_close(top_lp, logp.topk(TOP_LOGPROBS, -1).values)
    assert torch.equal(top_ids[:, 0], logits.argmax(-1))


def test_a_seeded_slot_draws_the_same_whatever_the_batch():
    logits = _logits(8, seed=1)
    seeds = torch.tensor([5, 6, 7, 8, 9, 10, 11, 12])
    batch, *_ = sample(logits, _params(8, seeds=seeds, counter=3))
    for i in range(8):  # alone, and in another slot of a batch with other requests
        alone, *_ = sample(logits[i:i + 1], _params(1, seeds=seeds[i:i + 1], counter=3))
        mixed = torch.cat([_logits(3, seed=9), logits[i:i + 1]])
        other, *_ = sample(mixed, _params(4, seeds=torch.tensor([1, 2, 3, int(seeds[i])]), counter=3))
        assert alone.item() == batch[i].item() == other[3].item()


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = probs * n
    seen = expected > 0
    assert counts[~seen].sum() == 0, "a token outside the kept set was drawn"
    return float((((counts - expected) ** 2)[seen] / expected[seen]).sum()), int(seen.sum()) - 1


def _draw(logits_row, n, **kw):
    p = _params(n, seeds=torch.arange(n, dtype=torch.long) * 7919 + 13, **kw)
    token, *_ = sample(logits_row.expand(n, V).contiguous(), p)
    return torch.bincount(token, minlength=V).double()


# chi-square critical values at p = 0.001 (the tolerance: a correct sampler fails 1 time in 1000 per check)
def _critical(dof: int) -> float:
    z = 3.090  # one-sided normal quantile for 0.001; Wilson-Hilferty approximation
    return dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3


def test_temperature_one_matches_the_softmax_of_a_tiny_models_first_token(gqa_ckpt):
    from hf_reference import global_generate

    g = torch.Generator().manual_seed(2)
    _, logits = global_generate(gqa_ckpt, torch.randint(0, 101, (20,), generator=g).tolist(),
                                torch.randint(0, 101, (3,), generator=g).tolist(), 1)
    row = logits.reshape(-1).float()
    assert row.shape == (V,) and torch.softmax(row, -1).max() < 0.5  # a spread-out distribution to test against
    counts = _draw(row, 40000)
    stat, dof = _chi_square(counts, torch.softmax(row.double(), -1))
    assert stat < _critical(dof), (stat, dof)


def test_temperature_top_k_and_top_p_draw_from_the_kept_tokens():
    row = _logits(1, seed=3, scale=1.5)[0]
    t = 0.8
    probs = torch.softmax(row.double() / t, -1)
    order = probs.argsort(descending=True)
    # top_k = 10
    kept = torch.zeros(V, dtype=torch.bool)
    kept[order[:10]] = True
    target = torch.where(kept, probs, 0.0)
    stat, dof = _chi_square(_draw(row, 30000, temperature=t, top_k=10), target / target.sum())
    assert stat < _critical(dof), (stat, dof)
    # top_p = 0.6: the smallest prefix of the sorted tokens with mass >= 0.6
    mass_before = probs[order].cumsum(0) - probs[order]
    kept = torch.zeros(V, dtype=torch.bool)
    kept[order[mass_before < 0.6]] = True
    target = torch.where(kept, probs, 0.0)
    stat, dof = _chi_square(_draw(row, 30000, temperature=t, top_p=0.6), target / target.sum())
    assert stat < _critical(dof), (stat, dof)


def test_a_row_gets_the_same_whatever_work_its_batch_needs():
    """The sampler does only what its rows need (SamplerWork.of: no sort without top-k / top-p, no draw for a
    greedy batch, no log-softmax without log-probs); each row's token and log-probs are those of the full work."""
    from types import SimpleNamespace

    from star_mcore.ops.sampling import SamplerWork

    logits = _logits(6, seed=4)
    settings = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_k=7),
                dict(temperature=1.3, top_p=0.8), dict(temperature=0.0, logprobs=3), dict(temperature=2.0)]
    rows = [SimpleNamespace(**{"top_k": 0, "top_p": 1.0, "logprobs": 0, **s}) for s in settings]
    p = SamplingParams(torch.tensor([r.temperature for r in rows]), torch.tensor([r.top_k for r in rows]),
                       torch.tensor([r.top_p for r in rows]), torch.arange(6) * 31 + 2, torch.full((6,), 4))
    full = sample(logits, p)
    assert SamplerWork.of(rows) == SamplerWork(True, True, True)
    assert SamplerWork.of(rows[:2]) == SamplerWork(True, False, False)
    assert SamplerWork.of([rows[0], None]) == SamplerWork(False, False, False)
    assert SamplerWork.of([rows[0], rows[4]]) == SamplerWork(False, False, True)
    for i, r in enumerate(rows):
        one = SamplingParams(*(t[i:i + 1] for t in (p.temperature, p.top_k, p.top_p, p.seed, p.counter)))
        work = SamplerWork.of([r])
        token, lp, top_ids, top_lp = sample(logits[i:i + 1], one, work)
        assert token.item() == full[0][i].item(), settings[i]
        if work.logprobs:
            assert lp.item() == full[1][i].item() and torch.equal(top_ids[0], full[2][i])
        else:
            assert lp.item() == 0 and not top_lp.any()
    # rows 1 and 5 draw without a sort alone, and with one beside rows 2 and 3: the same tokens, over many draws
    n = 2000
    many = SamplingParams(torch.ones(n), torch.zeros(n, dtype=torch.long), torch.ones(n), torch.arange(n),
                          torch.zeros(n, dtype=torch.long))
    sorted_tokens = sample(logits[1].expand(n, V).contiguous(), many)[0]
    plain_tokens = sample(logits[1].expand(n, V).contiguous(), many, SamplerWork(True, False, False))[0]
    assert torch.equal(sorted_tokens, plain_tokens) and len(set(plain_tokens.tolist())) > 5


def test_params_fill_copies_rows_in_place_and_idle_rows_are_greedy():
    """SamplingParams.fill: the one copy of rows' settings into the step's tensors (the same addresses, as a
    captured step needs); an idle row is greedy and a setting without a counter (a request's first token) is
    at token 0."""
    from types import SimpleNamespace

    p = SamplingParams.allocate(3, torch.device("cpu"))
    addresses = [t.data_ptr() for t in (p.temperature, p.top_k, p.top_p, p.seed, p.counter)]
    slot = SimpleNamespace(temperature=0.7, top_k=5, top_p=0.9, seed=-3, counter=11)
    request = SimpleNamespace(temperature=1.5, top_k=0, top_p=0.5, seed=2 ** 40)
    p.fill([slot, None, request])
    assert [t.data_ptr() for t in (p.temperature, p.top_k, p.top_p, p.seed, p.counter)] == addresses
    assert torch.allclose(p.temperature, torch.tensor([0.7, 0.0, 1.5]))
    assert p.top_k.tolist() == [5, 0, 0] and p.seed.tolist() == [-3, 0, 2 ** 40] and p.counter.tolist() == [11, 0, 0]
    assert torch.allclose(p.top_p, torch.tensor([0.9, 1.0, 0.5]))
