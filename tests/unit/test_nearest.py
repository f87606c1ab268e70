"""seit.utils.nearest.nearest_code against a brute-force reference."""

import pytest
import torch
import torch.nn.functional as F

from seit.utils.nearest import nearest_code


def _data(n=300, k=37, d=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)


def _reference(x, codebook, metric):
    """Full-matrix brute force: squared distances or similarities of every pair."""
    if metric == "l2":
        return ((x[:, None, :].double() - codebook[None].double()) ** 2).sum(-1), False
    if metric == "cosine":
        x = F.normalize(x, dim=1)
    return x.double() @ codebook.double().T, True


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("chunk", [1, 36, 37, 38, 37 * 7, 37 * 300, 1 << 24])  # < one row, row edges, one block
def test_matches_brute_force_at_every_chunk_size(metric, chunk):
    x, codebook = _data()
    if metric == "cosine":
        codebook = F.normalize(codebook, dim=1)
    ref, larger = _reference(x, codebook, metric)
    want = ref.argmax(1) if larger else ref.argmin(1)
    ids, scores = nearest_code(x, codebook, metric=metric, chunk=chunk, with_scores=True)
    assert ids.dtype == torch.long and ids.shape == (300,)
    assert torch.equal(ids, want)
    torch.testing.assert_close(scores.double(), ref.gather(1, want[:, None])[:, 0], rtol=1e-4, atol=1e-4)
    assert torch.equal(nearest_code(x, codebook, metric=metric, chunk=chunk), ids)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_top_lists_the_nearest_codes_best_first(metric):
    x, codebook = _data(n=50)
    ref, larger = _reference(x, codebook, metric)
    ids, scores = nearest_code(x, codebook, metric=metric, top=5, chunk=40, with_scores=True)
    assert ids.shape == scores.shape == (50, 5)
    assert torch.equal(ids, ref.topk(5, dim=1, largest=larger).indices)
    assert torch.equal(ids[:, 0], nearest_code(x, codebook, metric=metric))
    order = scores.diff(dim=1)
    assert bool((order <= 0).all()) if larger else bool((order >= 0).all())


def test_ties_go_to_the_lowest_index_and_exact_codes_map_to_themselves():
    _, codebook = _data(k=20)
    doubled = torch.cat([codebook, codebook])  # every code twice
    assert torch.equal(nearest_code(codebook, doubled, chunk=7), torch.arange(20))
    d2 = nearest_code(codebook, codebook, with_scores=True)[1]
    assert bool((d2 < 1e-4).all())  # ||x - x||^2, up to the expansion's rounding


def test_empty_input_and_bad_arguments():
    _, codebook = _data()
    ids, scores = nearest_code(torch.empty(0, 9), codebook, with_scores=True)
    assert ids.shape == scores.shape == (0,) and ids.dtype == torch.long
    assert nearest_code(torch.empty(0, 9), codebook, top=3).shape == (0, 3)
    x = torch.randn(4, 9)
    for kwargs, match in [({"metric": "hamming"}, "metric"), ({"chunk": 0}, "chunk"), ({"top": 38}, "top"),
                          ({"top": 0}, "top"), ({"metric": "cosine"}, "unit rows")]:
        with pytest.raises(ValueError, match=match):
            nearest_code(x, codebook, **kwargs)
    with pytest.raises(ValueError, match="width"):
        nearest_code(torch.randn(4, 8), codebook)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        nearest_code(torch.randn(2, 4, 9), codebook)
    with pytest.raises(ValueError, match="empty"):
        nearest_code(x, torch.empty(0, 9))


def test_no_gradient_and_results_on_the_inputs_device():
    x, codebook = _data(n=10)
    x.requires_grad_(True)
    ids, scores = nearest_code(x, codebook, with_scores=True)
    assert not scores.requires_grad and ids.device == x.device
