"""NEFTune (train.neftune_noise_alpha): each example's noise bound comes from its own length."""
import torch

from qlora.neftune import embedding_noise, example_lengths


def test_each_token_gets_the_length_of_its_own_example():
    one_row = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])  # three examples end to end (padding-free)
    assert example_lengths((1, 9), one_row).tolist() == [[3, 3, 3, 2, 2, 4, 4, 4, 4]]
    packed = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]])  # packed rows, padding as a segment of its own
    assert example_lengths((2, 5), packed).tolist() == [[3, 3, 3, 2, 2], [4, 4, 4, 4, 1]]
    padded = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])  # a padded batch: its mask
    assert example_lengths((2, 5), None, padded).tolist() == [[3] * 5, [5] * 5]
    assert example_lengths((2, 5)).tolist() == [[5] * 5] * 2


def noise_of(model, alpha, **inputs):
    """What the hook added to the input embeddings in one forward (the embeddings without it subtracted)."""
    seen = []
    with embedding_noise(model, alpha), torch.no_grad():
        hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out))  # after ours
        model(**inputs)
        hook.remove()
        clean = model.get_input_embeddings().weight[inputs["input_ids"]]
    return seen[0] - clean


def test_the_noise_is_bounded_by_each_examples_length_however_it_is_batched(tiny_model):
    """alpha / sqrt(L d): the same for an example padded in a batch or laid end to end with others,
    and none in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    d, alpha, lengths = model.config.hidden_size, 5.0, [7, 3, 12]
    torch.manual_seed(0)
    examples = [torch.randint(10, 100, (n,)) for n in lengths]
    model.train()
    row = noise_of(model, alpha, input_ids=torch.cat(examples)[None],
                   position_ids=torch.cat([torch.arange(n) for n in lengths])[None])
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, ex in enumerate(examples):
        ids[i, :len(ex)], mask[i, :len(ex)] = ex, 1
    padded = noise_of(model, alpha, input_ids=ids, attention_mask=mask)
    start = 0
    for i, n in enumerate(lengths):
        bound = alpha / (n * d) ** 0.5
        for noise in (row[0, start:start + n], padded[i, :n]):
            assert noise.abs().max() <= bound * (1 + 1e-5)
            assert noise.abs().max() > 0.9 * bound  # uniform over [-bound, bound]: n x 64 draws reach near it
        start += n
    model.eval()
    assert noise_of(model, alpha, input_ids=ids, attention_mask=mask).abs().max() == 0
    model.train()
    assert noise_of(model, 0.0, input_ids=ids, attention_mask=mask).abs().max() == 0
