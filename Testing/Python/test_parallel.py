"""The CPU worker pool used by grid evaluation."""

import pytest
import torch
from MetaShapeReconLib.parallel import parallel_map


def test_parallel_map_keeps_order_and_the_callers_threads():
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        seen = parallel_map(lambda x: (x, torch.get_num_threads()), list(range(9)), 2)
        assert [x for x, _ in seen] == list(range(9))
        assert all(threads == 1 for _, threads in seen)  # each worker runs PyTorch single-threaded
        assert torch.get_num_threads() == 2
        with pytest.raises(ZeroDivisionError):
            parallel_map(lambda x: 1 // x, [1, 0, 2], 2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
