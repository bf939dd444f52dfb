"""data.padding_free: when it applies, and how a one-row micro-batch is cut into its examples."""
import pytest
import torch

from qlora.config import Switch
from qlora.padding_free import padding_free_wanted, padding_share, spans


def test_auto_is_on_for_cpu_training_with_sdpa_unless_packed_or_compiled_with_little_padding():
    assert padding_free_wanted(Switch.auto, "cpu", False, "sdpa", False, 0.0)
    assert not padding_free_wanted(Switch.auto, "cpu", True, "sdpa", False, 0.5)  # packed rows are full already
    assert not padding_free_wanted(Switch.auto, "cuda", False, "sdpa", False, 0.5)  # unmeasured on GPUs
    assert not padding_free_wanted(Switch.auto, "cpu", False, "eager", False, 0.5)  # a dense mask over the row
    assert not padding_free_wanted(Switch.auto, "cpu", False, "sdpa", True, 0.03)  # splits the compiled graphs
    assert padding_free_wanted(Switch.auto, "cpu", False, "sdpa", True, 0.3)  # ... which is worth 30% padding
    assert padding_free_wanted(Switch.true, "cuda", True, "flash_attention_2", True, 0.0)
    assert not padding_free_wanted(Switch.false, "cpu", False, "sdpa", False, 0.5)


def test_padding_share_is_the_padding_of_random_micro_batches():
    assert padding_share([10] * 20, 4) == padding_share([], 4) == 0.0
    assert padding_share([10, 30], 4) == pytest.approx(1 / 3)  # fewer rows than a batch: one batch of all
    assert 0.15 < padding_share([10, 30] * 50, 2) < 0.25  # half the pairs mixed (20 of 60 padding): 1/5 in all


def test_spans_are_the_examples_of_a_row_whose_positions_restart():
    row = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert spans(row) == [(0, 3), (3, 5), (5, 9)]
    assert spans(row) is spans(row), "worked out once per forward pass, not once per layer"
    assert spans(torch.tensor([[0, 1, 2, 3]])) is None  # one example: plain causal attention
    assert spans(torch.tensor([[7, 8, 0, 1]])) is None  # not the start of a row (a cached step)
