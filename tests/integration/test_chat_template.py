"""A base model without a chat template: model.chat_template=chatml adds its tokens, the embeddings
grow, the new rows train and travel with the adapter, and generation and merge see the same shapes."""
import json

import torch
from safetensors.torch import load_file

from qlora.cli import compose, main
from qlora.train import fit
from tests.conftest import CORPUS, people_rows, tiny_overrides, write_jsonl


def make_base_without_template(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", pad_token="<pad>")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path, len(tok)


def test_chatml_on_a_base_model_adds_tokens_trains_them_and_merges(tmp_path, capsys):
    base, vocab = make_base_without_template(tmp_path / "base")
    data = (write_jsonl(tmp_path / "t.jsonl", people_rows(8)), write_jsonl(tmp_path / "e.jsonl", people_rows(2)))
    run = fit(compose("train", tiny_overrides(base, data, tmp_path / "run", **{"model.chat_template": "chatml",
                                                                               "train.max_steps": 3})))
    weights = load_file(str(run.run_dir / "adapter" / "adapter_model.safetensors"))
    saved = {k: v.shape for k, v in weights.items() if "embed_tokens" in k or "lm_head" in k}
    assert saved and all(shape[0] == vocab + 2 for shape in saved.values()), saved
    assert json.loads((run.run_dir / "adapter" / "adapter_config.json").read_text())["modules_to_save"]

    from qlora.inference import load_for_inference

    loaded = load_for_inference(compose("train", [f"adapter={run.run_dir}"]))
    assert loaded.model.get_input_embeddings().weight.shape[0] == vocab + 2
    assert "<|im_end|>" in loaded.tokenizer.get_vocab()

    out = tmp_path / "merged"
    assert main(["merge", f"adapter={run.run_dir}", f"output_dir={out}", "merge.dtype=float32"]) == 0
    assert json.loads((out / "config.json").read_text())["vocab_size"] == vocab + 2
    assert json.loads((out / "merge_report.json").read_text())["top1_agreement"] >= 0.99


# ChatML that raises on a system message, as Gemma 2's template does (and Mistral's first)
NO_SYSTEM_ROLE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                  "supported') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_without_a_system_role_gets_the_system_message_in_the_first_user_turn(tmp_path, capsys):
    """Training data with system messages, and a system prompt at generation, on a model whose chat template
    raises on them (Gemma 2's): the system message opens the first user turn, as Gemma 3's template writes
    it, and the run says how many examples that was; before, training ended in jinja's traceback."""
    from qlora.data import render_chat
    from tests.conftest import make_tokenizer, make_tiny_llama

    base = make_tiny_llama(tmp_path / "base")
    tok = make_tokenizer(NO_SYSTEM_ROLE)
    tok.save_pretrained(base)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]
    assert render_chat(tok, conv) == ("<|im_start|>user\nBe brief.\n\nHi<|im_end|>\n"
                                      "<|im_start|>assistant\nHello<|im_end|>\n")
    rows = people_rows(8)
    for row in rows[:3]:
        row["messages"].insert(0, {"role": "system", "content": "Answer in JSON."})
    data = (write_jsonl(tmp_path / "t.jsonl", rows), write_jsonl(tmp_path / "e.jsonl", people_rows(2)))
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(base, data, run, **{"train.max_steps": 1})]) == 0
    err = capsys.readouterr().err
    assert "so the system message of 3 example(s) opens the first user turn" in err, err
    assert main(["generate", f"adapter={run}", "prompt=Hello", "system=Be brief.", "gen.max_new_tokens=2"]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_a_conversation_the_template_refuses_names_its_row_and_the_reason(tmp_path, capsys):
    """A template that refuses a conversation for another reason (Mistral's: roles must alternate) is a bad row:
    its file and line, and the template's words."""
    from tests.conftest import make_tokenizer, make_tiny_llama

    alternate = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                 "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}{% endif %}"
                 "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    base = make_tiny_llama(tmp_path / "base")
    make_tokenizer(alternate).save_pretrained(base)
    rows = people_rows(8)
    rows[5]["messages"].insert(0, {"role": "user", "content": "Hello?"})
    data = (write_jsonl(tmp_path / "t.jsonl", rows), write_jsonl(tmp_path / "e.jsonl", people_rows(2)))
    assert main(["train", *tiny_overrides(base, data, tmp_path / "run", **{"train.max_steps": 1})]) == 2
    err = capsys.readouterr().err
    assert "t.jsonl:6: the chat template refuses this conversation: Conversation roles must alternate" in err, err
    assert "Traceback" not in err


# Mistral-7B-Instruct v0.3's way with a system message: written with the last user turn only
SYSTEM_WITH_LAST_USER = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
                         "{% set messages = messages[1:] %}{% endif %}{% for m in messages %}"
                         "{% if m['role'] == 'user' %}<|im_start|>user\n"
                         "{% if loop.last and system is defined %}{{ system }}\n\n{% endif %}"
                         "{{ m['content'] }}<|im_end|>\n{% else %}<|im_start|>assistant\n{{ m['content'] }}<|im_end|>\n"
                         "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_that_writes_the_system_message_with_the_last_user_turn_trains_with_it(tmp_path, capsys):
    """Mistral v0.3's template puts the system message in the prompt of an answer but leaves it out of the
    conversation that goes on past it, so the answer's tokens could not be located and such rows were
    refused. The system message now opens the first user turn: in the prompt and in the trained text alike."""
    from qlora.data import DataStats, read_examples, tokenize_examples
    from qlora.config import DataConfig
    from tests.conftest import make_tokenizer, make_tiny_llama

    tok = make_tokenizer(SYSTEM_WITH_LAST_USER)
    rows = people_rows(4)
    rows[0]["messages"].insert(0, {"role": "system", "content": "Answer in JSON."})
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    stats = DataStats()
    out = tokenize_examples(tok, read_examples(str(path), DataConfig(path=str(path))), DataConfig(path=str(path)),
                            512, stats)
    assert stats.system_folded == 1
    assert tok.decode(out[0]["input_ids"]).startswith("<|im_start|>user\nAnswer in JSON.\n\nExtract")
    base = make_tiny_llama(tmp_path / "base")
    tok.save_pretrained(base)
    data = (path, write_jsonl(tmp_path / "e.jsonl", people_rows(2)))
    assert main(["train", *tiny_overrides(base, data, tmp_path / "run", **{"train.max_steps": 1})]) == 0
    assert "so the system message of 1 example(s) opens the first user turn" in capsys.readouterr().err
