"""data.padding_free: when it applies, and how a one-row micro-batch is cut into its examples."""
import torch

from qlora.config import Switch
from qlora.padding_free import padding_free_wanted, spans
from qlora.speed import compile_wanted


def test_auto_is_on_for_cpu_training_with_sdpa_without_compile_or_packing():
    assert padding_free_wanted(Switch.auto, "cpu", False, False, "sdpa")
    assert not padding_free_wanted(Switch.auto, "cpu", True, False, "sdpa")  # compiled layers: Python spans
    assert not padding_free_wanted(Switch.auto, "cpu", False, True, "sdpa")  # packed rows are full already
    assert not padding_free_wanted(Switch.auto, "cuda", False, False, "sdpa")  # unmeasured on GPUs
    assert not padding_free_wanted(Switch.auto, "cpu", False, False, "eager")  # a dense mask over the row
    assert padding_free_wanted(Switch.true, "cuda", False, True, "flash_attention_2")
    assert not padding_free_wanted(Switch.false, "cpu", False, False, "sdpa")


def test_compile_auto_leaves_a_padding_free_run_eager():
    assert not compile_wanted(Switch.auto, "cpu", 10_000, Switch.true)


def test_spans_are_the_examples_of_a_row_whose_positions_restart():
    row = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert spans(row) == [(0, 3), (3, 5), (5, 9)]
    assert spans(row) is spans(row), "worked out once per forward pass, not once per layer"
    assert spans(torch.tensor([[0, 1, 2, 3]])) is None  # one example: plain causal attention
    assert spans(torch.tensor([[7, 8, 0, 1]])) is None  # not the start of a row (a cached step)
