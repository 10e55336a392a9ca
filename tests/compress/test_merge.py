import torch

from kvmem.compress.merge import Merge


def test_evicted_token_is_averaged_into_its_most_similar_kept_token() -> None:
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.1], [-1.0, 0.2]]])  # [H=1, T=4, D=2]
    values = torch.tensor([[[10.0], [20.0], [30.0], [40.0]]])
    keep = torch.tensor([[0, 1]])
    merged_k, merged_v = Merge(threshold=0.5).apply(keys, values, keep)
    sim = torch.nn.functional.cosine_similarity(keys[0, 2], keys[0, 0], dim=0)
    # token 2 joins token 0 (similar); token 3 points away from both kept keys and is dropped
    torch.testing.assert_close(merged_k[0, 0], (keys[0, 0] + sim * keys[0, 2]) / (1 + sim))
    torch.testing.assert_close(merged_v[0, 0], (values[0, 0] + sim * values[0, 2]) / (1 + sim))
    torch.testing.assert_close(merged_k[0, 1], keys[0, 1])
    torch.testing.assert_close(merged_v[0, 1], values[0, 1])


def test_nothing_evicted_changes_nothing() -> None:
    keys, values = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    keep = torch.arange(5).expand(2, 5)
    merged_k, merged_v = Merge().apply(keys, values, keep)
    torch.testing.assert_close(merged_k, keys)
    torch.testing.assert_close(merged_v, values)
