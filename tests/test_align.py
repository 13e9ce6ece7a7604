"""Block alignment: every routed slot exactly once, in a block of its own expert."""

import pytest
import torch

from moetune.kernels import align_tokens, max_padded_rows


def check_alignment(ids, num_experts, block_m):
    aligned = align_tokens(ids, num_experts, block_m)
    flat = ids.reshape(-1).long()
    numel = flat.numel()
    valid = (flat >= 0) & (flat < num_experts)
    counts = torch.bincount(flat[valid], minlength=num_experts)
    expected_rows = int(((counts + block_m - 1) // block_m * block_m).sum())
    assert int(aligned.padded_rows.item()) == expected_rows
    assert aligned.sorted_ids.numel() == max_padded_rows(numel, num_experts, block_m) >= expected_rows
    rows = aligned.sorted_ids[:expected_rows].long()
    real = rows[rows < numel]
    assert torch.all((rows >= 0) & (rows <= numel))  # a slot or the padding sentinel
    assert sorted(real.tolist()) == torch.nonzero(valid).flatten().tolist()  # each valid slot once
    blocks = aligned.expert_ids[: expected_rows // block_m].long()
    owner = blocks.repeat_interleave(block_m)
    row_is_real = rows < numel
    assert torch.equal(flat[rows[row_is_real]], owner[row_is_real])  # each slot sits in its expert's block
    assert torch.all(aligned.expert_ids[expected_rows // block_m:] == -1)
    assert torch.all(aligned.sorted_ids[expected_rows:] == numel)
    return aligned


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("M,topk,E,block_m", [(1, 1, 1, 16), (5, 2, 4, 16), (33, 4, 8, 16), (33, 3, 8, 64),
                                               (200, 8, 64, 32), (7, 2, 300, 16)])
def test_alignment_is_a_padded_sort_by_expert(M, topk, E, block_m, rng):
    ids = torch.stack([torch.randperm(E, generator=rng)[:topk] for _ in range(M)]).to(torch.int32)
    check_alignment(ids, E, block_m)


@pytest.mark.usefixtures("poison_empty")
def test_alignment_skips_out_of_range_ids():
    ids = torch.tensor([[0, -1], [4, 1], [1, 9], [-3, -3]], dtype=torch.int32)
    aligned = check_alignment(ids, 4, 16)
    assert int(aligned.padded_rows.item()) == 32  # experts 0 and 1 only


@pytest.mark.usefixtures("poison_empty")
def test_alignment_of_all_slots_on_one_expert():
    ids = torch.full((40, 1), 2, dtype=torch.int32)
    aligned = check_alignment(ids, 3, 16)
    assert aligned.expert_ids[:3].tolist() == [2, 2, 2]
