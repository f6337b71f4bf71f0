"""The spec itself, on cases small enough to compute by hand, and against the trackers' official
recipes (restated in fasttrack.reference)."""
import math

import pytest
import torch

from fasttrack import reference as ref


def test_keep_and_merge_counts():
    assert ref.keep_count(0.7, 256) == 180 and ref.keep_count(0.7, 180) == 126 and ref.keep_count(0.7, 126) == 89
    assert ref.keep_count(0.7, 576) == 404 and ref.keep_count(1.0, 37) == 37
    assert ref.merge_count(0.9, 320) == 288 and ref.merge_count(0.01, 10) == 1


def _attn_with_row(B, H, N, row, values):
    attn = torch.zeros(B, H, N, N)
    attn[:, :, row, :] = torch.tensor(values)
    return attn


def test_topk_select_hand_case():
    # N=6, candidates [2, 6): one query row (1) scores them 0.1, 0.4, 0.2, 0.3 -> keep ceil(0.5*4)=2
    attn = _attn_with_row(1, 2, 6, 1, [0.0, 0.0, 0.1, 0.4, 0.2, 0.3])
    x = torch.arange(6.0).view(1, 6, 1)
    tokens, keep, removed, kg, rg = ref.topk_select(attn, x, torch.tensor([[1]]), None, None,
                                                   torch.tensor([[10, 11, 12, 13]]), 2, 4, 0.5)
    assert keep.tolist() == [[1, 3]] and removed.tolist() == [[2, 0]]
    assert tokens.flatten().tolist() == [0.0, 1.0, 3.0, 5.0]
    assert kg.tolist() == [[11, 13]] and rg.tolist() == [[12, 10]]


def test_topk_select_weights_bonus_ties_and_tail():
    # two rows: row 0 says [1, 0, 0], row 1 says [0, 0, 1] with weight 0 -> only row 0 counts;
    # bonus lifts candidate 2 to tie with candidate 0 -> tie goes to the lower index.
    N = 5
    attn = torch.zeros(1, 1, N, N)
    attn[0, 0, 0, 1:4] = torch.tensor([1.0, 0.0, 0.0])
    attn[0, 0, 1, 1:4] = torch.tensor([0.0, 0.0, 1.0])
    x = torch.arange(5.0).view(1, 5, 1)
    tokens, keep, removed, *_ = ref.topk_select(attn, x, torch.tensor([[0, 1]]), torch.tensor([[1.0, 0.0]]),
                                               torch.tensor([[0.0, 0.0, 0.5]]), None, 1, 3, 0.6)
    # score = mean_r(w*a) + bonus = [0.5, 0, 0.5]; k = ceil(1.8) = 2
    assert keep.tolist() == [[0, 2]] and removed.tolist() == [[1]]
    assert tokens.flatten().tolist() == [0.0, 1.0, 3.0, 4.0]  # tail token 4 kept after the candidates


def test_topk_select_nothing_removed_is_identity():
    attn = torch.rand(2, 3, 7, 7).softmax(-1)
    x = torch.randn(2, 7, 4)
    tokens, keep, removed, kg, rg = ref.topk_select(attn, x, torch.tensor([[0], [1]]), None, None, None, 3, 4, 0.9)
    assert torch.equal(tokens, x) and tokens.data_ptr() != x.data_ptr()
    assert keep.tolist() == [[0, 1, 2, 3]] * 2 and removed.shape == (2, 0)


def test_topk_select_equals_official_candidate_elimination():
    B, H, lt, ls, C = 2, 4, 16, 64, 8
    N = lt + ls
    attn = torch.rand(B, H, N, N, dtype=torch.float64).softmax(-1)
    x = torch.randn(B, N, C, dtype=torch.float64)
    gidx = torch.arange(ls).expand(B, ls) + 100
    box_mask = torch.zeros(B, lt, dtype=torch.bool)
    box_mask[:, 5] = True
    official = ref.official_candidate_elimination(attn, x, lt, 0.7, gidx, box_mask)
    ours = ref.topk_select(attn, x, torch.full((B, 1), 5), None, None, gidx, lt, ls, 0.7)
    torch.testing.assert_close(ours[0], official[0].to(ours[0].dtype))
    assert torch.equal(ours[3], official[1]) and torch.equal(ours[4], official[2])


def test_topk_select_qk_equals_topk_select_on_the_attention_map():
    B, H, N, D = 2, 3, 12, 8
    q, k = torch.randn(B, H, N, D), torch.randn(B, H, N, D)
    attn = torch.softmax(q @ k.transpose(-1, -2) * D ** -0.5, -1)
    x = torch.randn(B, N, 5)
    qi = torch.tensor([[0, 2], [1, 3]])
    a = ref.topk_select(attn, x, qi, None, None, None, 4, 8, 0.5)
    b = ref.topk_select_qk(q, k, x, qi, None, None, None, 4, 8, 0.5, D ** -0.5)
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], b[0])


def test_pad_scatter_and_gather_hand_case():
    kept = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    out = ref.pad_scatter(kept, torch.tensor([[3, 0]]), 4)
    assert out.tolist() == [[[3.0, 4.0], [0.0, 0.0], [0.0, 0.0], [1.0, 2.0]]]
    nchw = ref.pad_scatter(kept, torch.tensor([[3, 0]]), 4, "nchw", (2, 2))
    assert nchw.tolist() == [[[[3.0, 0.0], [0.0, 1.0]], [[4.0, 0.0], [0.0, 2.0]]]]
    assert torch.equal(ref.gather_tokens(out, torch.tensor([[3, 0]])), kept)
    assert torch.equal(ref.gather_tokens(nchw, torch.tensor([[3, 0]]), "nchw"), kept)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pad_scatter_equals_official_recipe(dtype):
    B, L, k, C = 2, 16, 5, 4
    perm = torch.stack([torch.randperm(L) for _ in range(B)])
    keep, removed = perm[:, :k], perm[:, k:]
    x = torch.randn(B, k, C).to(dtype)
    official = ref.official_pad_scatter(x, keep, removed)
    ours = ref.pad_scatter(x, keep, L)
    assert official.dtype == torch.float32 and ours.dtype == dtype  # the documented difference
    assert torch.equal(ours.float(), official)


def test_merge_tokens_hand_case():
    # scores rank tokens 2 > 0 > 1 > 3; K = floor(0.5*4) = 2 targets: [2, 0]; sources [1, 3].
    z = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]])
    score = torch.tensor([[0.5, 0.2, 0.9, 0.1]])
    merged, tgt, src, assign = ref.merge_tokens(z, score, None, None, 0.5, "sum")
    assert tgt.tolist() == [[2, 0]] and src.tolist() == [[1, 3]]
    assert assign.tolist() == [[1, 0]]  # token 1 is closest to token 0 (slot 1), token 3 to token 2 (slot 0)
    torch.testing.assert_close(merged, torch.tensor([[[0.1, 1.9], [1.9, 0.1]]]))
    mean, *_ = ref.merge_tokens(z, score, None, None, 0.5, "mean")
    torch.testing.assert_close(mean, merged / 2)


def test_merge_tokens_ties_and_zero_vectors():
    # both targets equally similar to the source -> the earlier target in score order wins;
    # a zero source has similarity 0 to everything -> also slot 0.
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]])
    score = torch.tensor([[0.9, 0.8, 0.1, 0.0]])
    _, tgt, src, assign = ref.merge_tokens(z, score, None, None, 0.5, "sum")
    assert tgt.tolist() == [[0, 1]] and assign.tolist() == [[0, 0]]


def test_merge_tokens_projection_and_full_ratio():
    z = torch.randn(2, 9, 4)
    proj = torch.randn(4)
    merged, tgt, src, assign = ref.merge_tokens(z, None, proj, None, 1.0, "sum")
    order = torch.sort(z @ proj, dim=1, descending=True, stable=True).indices
    assert torch.equal(tgt, order) and src.shape == (2, 0) and assign.shape == (2, 0)
    assert torch.equal(merged, z.gather(1, order[..., None].expand(-1, -1, 4)))


def test_bipartite_merge_hand_case():
    # tokens: A = {0, 2}, B = {1, 3}; token 2 is identical to token 3 -> merges first (r=1).
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [1.0, 1.0]]])
    merged, size = ref.bipartite_merge(x, 1)
    # unmerged A: token 0; B: token 1, token 3 merged with token 2 by mean
    torch.testing.assert_close(merged, torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.5, 1.5]]]))
    assert size.flatten().tolist() == [1.0, 1.0, 2.0]
    # token 0 matches token 3 exactly and would merge first; protecting it (protected=1) makes
    # token 2 the source instead, and it goes to its best destination, token 3.
    x = torch.tensor([[[1.0, 1.0], [0.0, 1.0], [3.0, 0.0], [1.0, 1.0]]])
    merged, _ = ref.bipartite_merge(x, 1)
    torch.testing.assert_close(merged, torch.tensor([[[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]))
    merged, size = ref.bipartite_merge(x, 1, protected=1)
    torch.testing.assert_close(merged, torch.tensor([[[1.0, 1.0], [0.0, 1.0], [2.0, 0.5]]]))
    assert size.flatten().tolist() == [1.0, 1.0, 2.0]
    # protected=2 also forbids B token 1 as a destination: token 2 still goes to token 3
    merged, _ = ref.bipartite_merge(x, 1, protected=2)
    torch.testing.assert_close(merged, torch.tensor([[[1.0, 1.0], [0.0, 1.0], [2.0, 0.5]]]))


def test_pruned_linear_equals_masked_dense():
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    W = torch.randn(7, 12, dtype=torch.float64)
    b = torch.randn(7, dtype=torch.float64)
    idx = torch.tensor([0, 3, 4, 8, 11])
    mask = torch.zeros(12, dtype=torch.float64)
    mask[idx] = 1
    torch.testing.assert_close(ref.pruned_linear(x, W[:, idx], b, idx), ref.masked_dense_linear(x, W, b, mask))
    ln_w, ln_b = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    h = torch.nn.functional.layer_norm(x, (12,), ln_w, ln_b, 1e-6)
    torch.testing.assert_close(ref.pruned_linear(x, W[:, idx], b, idx, ln_w, ln_b, 1e-6, True),
                               ref.masked_dense_linear(h, W, b, mask))
    assert math.isclose(ref.pruned_linear(torch.ones(1, 12), torch.ones(1, 5), None, idx).item(), 5.0)
