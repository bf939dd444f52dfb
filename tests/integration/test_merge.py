"""Merge: the merged folder loads with plain transformers and behaves like the adapter model."""
import json

import pytest
import torch

from qlora.cli import compose, main
from qlora.inference import load_for_inference
from qlora.errors import UserError
from qlora.merge import compare_logits, parse_size
from tests.conftest import make_tiny_gemma3_with_vision, tiny_overrides


def test_merged_folder_loads_without_peft_and_matches_the_adapter(tiny_run, tiny_merged):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _ = tiny_run
    report = json.loads((tiny_merged / "merge_report.json").read_text())
    assert report["top1_agreement"] == 1.0 and report["max_logit_diff"] < 1e-4, report
    model = AutoModelForCausalLM.from_pretrained(tiny_merged, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_merged)
    assert "quantization_config" not in json.loads((tiny_merged / "config.json").read_text())
    assert tok.chat_template == run.tokenizer.chat_template and tok.pad_token != tok.eos_token
    gen = json.loads((tiny_merged / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    # fp32 products (exact=True), as the merge's self-check takes them: gen.bf16_base_products would
    # round the inputs and weights of the 4-bit layers to bf16
    adapter_model = load_for_inference(compose("train", [f"adapter={run.run_dir}"]), exact=True).model
    texts = ["Maria is 34 years old and lives in Lisbon.", "What is the capital of France?"]
    stats = compare_logits(adapter_model, model, tok, texts)
    assert stats["max_logit_diff"] < 1e-4, stats


def test_merging_into_the_original_weights_is_a_different_model(tiny_run, tiny_merged, tmp_path):
    run, _ = tiny_run
    out = tmp_path / "orig"
    main(["merge", f"adapter={run.run_dir}", f"output_dir={out}", "merge.into=original",
          "merge.dtype=float32", "merge.min_top1_agreement=0"])
    report = json.loads((out / "merge_report.json").read_text())
    dq = json.loads((tiny_merged / "merge_report.json").read_text())
    assert report["max_logit_diff"] > 100 * dq["max_logit_diff"]


def test_float16_merge_is_sharded_and_still_agrees(tiny_run, tmp_path):
    run, _ = tiny_run
    out = tmp_path / "f16"
    assert main(["merge", f"adapter={run.run_dir}", f"output_dir={out}", "merge.max_shard_size=100KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "merge_report.json").read_text())["top1_agreement"] >= 0.99


def test_merge_refuses_existing_output_and_missing_adapter(tiny_run, tiny_merged, tmp_path, capsys):
    run, _ = tiny_run
    assert main(["merge", f"adapter={run.run_dir}", f"output_dir={tiny_merged}"]) == 2
    assert "overwrite=true" in capsys.readouterr().err
    assert main(["merge", f"adapter={tmp_path}", f"output_dir={tmp_path / 'x'}"]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_adapter_for_another_base_is_refused(tiny_run, tmp_path, capsys):
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    run, _ = tiny_run
    other = tmp_path / "other"
    shutil.copytree(run.run_dir / "adapter", tmp_path / "adapter")  # an adapter alone, outside its run
    config = LlamaConfig.from_pretrained(run.trainer.model.peft_config["default"].base_model_name_or_path)
    config.intermediate_size = 96
    LlamaForCausalLM(config).save_pretrained(other)
    run.tokenizer.save_pretrained(other)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(other)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "m"
    assert main(["merge", f"adapter={tmp_path / 'adapter'}", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "does not fit the base model" in err and "mlp" in err, err
    assert not out.exists()


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MiB") == 500 * 2**20
    with pytest.raises(UserError, match="merge.max_shard_size"):
        parse_size("lots")


def test_the_logit_comparison_never_reports_a_negative_kl():
    from qlora.merge import compare

    g = torch.Generator().manual_seed(0)
    ref = [torch.randn(64, 49152, generator=g) for _ in range(3)]  # SmolLM2's vocabulary
    same = [a + torch.randn(a.shape, generator=g) * 1e-6 for a in ref]  # equal but for float rounding
    report = compare(ref, same)
    assert report["top1_agreement"] == 1.0 and 0.0 <= report["kl"] < 1e-6
    assert compare(ref, [a.flip(-1) for a in ref])["kl"] > 1.0


def test_the_self_check_takes_held_out_conversations_else_built_in_prompts(tiny_model, tiny_data, tmp_path):
    from qlora.data import split_examples
    from qlora.merge import CHECK_PROMPTS, check_texts
    from qlora.train import fit
    from tests.conftest import tiny_overrides, write_jsonl

    run = fit(compose("train", tiny_overrides(tiny_model, tiny_data, tmp_path / "share", **{
        "data.eval_path": "null", "data.eval_fraction": 0.25, "train.max_steps": 1})))
    cfg = compose("train", [f"adapter={run.run_dir}"])
    _, held, _ = split_examples(compose("train", tiny_overrides(tiny_model, tiny_data, tmp_path / "x", **{
        "data.eval_path": "null", "data.eval_fraction": 0.25})).data, 0)
    texts = check_texts(cfg, run.tokenizer, 4)
    assert texts == [run.tokenizer.apply_chat_template(ex.messages, tokenize=False) for ex in held[:4]]
    # plain text has no conversations to check with: the built-in prompts
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": f"Once upon a time {i}."} for i in range(12)])
    run = fit(compose("train", tiny_overrides(tiny_model, (plain, plain), tmp_path / "plain", **{
        "train.max_steps": 1})))
    texts = check_texts(compose("train", [f"adapter={run.run_dir}"]), run.tokenizer, 2)
    assert [CHECK_PROMPTS[0] in texts[0], CHECK_PROMPTS[1] in texts[1]] == [True, True]


def test_rank_stabilized_lora_trains_and_merges_with_its_scale(tiny_model, tiny_data, tmp_path):
    """lora.use_rslora scales by lora_alpha / sqrt(r): 8 / 4 = 2 at r=16, where plain LoRA has 8 / 16. The
    merge adds the adapter at that scale: the merged model matches the adapter model."""
    from tests.conftest import tiny_overrides

    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(tiny_model, tiny_data, run, **{
        "lora.use_rslora": "true", "lora.r": 16, "lora.lora_alpha": 8})]) == 0
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["use_rslora"] is True
    model = load_for_inference(compose("train", [f"adapter={run}"]), exact=True).model
    scales = {m.scaling["default"] for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert scales == {2.0}
    out = tmp_path / "merged"
    assert main(["merge", f"adapter={run}", f"output_dir={out}", "merge.dtype=float32"]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert report["top1_agreement"] == 1.0 and report["max_logit_diff"] < 1e-4, report


def test_a_model_whose_weights_are_renamed_on_load_merges_and_starts_loftq(tiny_data, tmp_path, capsys,
                                                                           monkeypatch):
    """Merge and LoftQ find each LoRA layer's weight in the files under the name transformers loads it by;
    a layer found under none is refused by name, where before it was left out of the merged model. LoRA
    goes on the language model only. GGUF export of this model (whose attention is scaled otherwise than
    llama.cpp assumes of Gemma 3) is refused before the merge."""
    from safetensors import safe_open

    base = make_tiny_gemma3_with_vision(tmp_path / "gemma3")
    with safe_open(str(base / "model.safetensors"), framework="pt") as f:
        assert "language_model.model.layers.0.self_attn.q_proj.weight" in f.keys()  # the files' names
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(base, tiny_data, run, **{
        "train.max_steps": 2, "lora.init": "loftq", "eval.exact_match": "false"})]) == 0
    err = capsys.readouterr().err
    assert "lora.init=loftq: LoRA in 14 layers starts at" in err, err  # 2 layers x 7, all found in the files
    assert "not in the model's files" not in err
    # all-linear: the language model's layers only; text training never runs the vision tower
    assert "not those of model.vision_tower, which training on text never runs" in err
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        layers = sum(1 for k in f.keys() if ".lora_A." in k)
        assert layers == 14 and not any("vision" in k for k in f.keys())

    assert main(["merge", f"adapter={run}", f"output_dir={tmp_path / 'merged'}", "merge.dtype=float32"]) == 0
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["top1_agreement"] == 1.0 and report["max_logit_diff"] < 1e-4, report
    # the image processor's settings kept, so that the merged folder reads images as the base does
    kept = tmp_path / "merged" / "preprocessor_config.json"
    assert kept.read_text() == (base / "preprocessor_config.json").read_text()
    capsys.readouterr()

    assert main(["export", f"adapter={run}", "export.format=gguf", f"output_dir={tmp_path / 'gguf'}"]) == 2
    err = capsys.readouterr().err  # refused before the merge, which takes minutes on a large model
    assert "llama.cpp assumes attention scaled by 1/sqrt(16) of gemma3, where this model has " \
           "query_pre_attn_scalar=256" in err and "merging" not in err, err
    assert not (tmp_path / "gguf").exists()

    monkeypatch.setattr("qlora.merge.checkpoint_names", lambda model: lambda key: key)  # the names as in the files
    assert main(["merge", f"adapter={run}", f"output_dir={tmp_path / 'unmatched'}"]) == 1
    err = capsys.readouterr().err
    assert f"the base's safetensors files hold no weight named for {layers} LoRA layer(s), e.g. model." in err, err
    assert not (tmp_path / "unmatched").exists()


def test_the_self_check_reads_from_the_disk_what_does_not_fit_in_memory(tiny_run, tmp_path, monkeypatch, capsys):
    """The self-check holds the merged model in fp32: an 8B model's 32 GB fit neither a 24 GB GPU nor Colab's
    RAM. Given room for a fraction of the tiny model, the layers that do not fit are read from the merged
    files as they run (accelerate's offloading): same agreement, the merge kept, no offload folder left."""
    import transformers

    run, _ = tiny_run
    placed = {}
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spying(*args, **kwargs):
        model = original(*args, **kwargs)
        placed.update(getattr(model, "hf_device_map", {}))
        return model

    monkeypatch.setattr("qlora.merge.CHECK_MAX_MEMORY", {"cpu": 100_000})  # bytes: a fifth of the tiny model
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spying)
    out = tmp_path / "merged"
    assert main(["merge", f"adapter={run.run_dir}", f"output_dir={out}", "merge.dtype=float32"]) == 0, \
        capsys.readouterr().err
    assert "disk" in placed.values(), placed
    assert json.loads((out / "merge_report.json").read_text())["top1_agreement"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_the_check_texts_go_through_the_model_in_batches_with_the_logits_of_one_at_a_time(tiny_model):
    """The self-check's texts go through the model 8 at a time, padded on the right: each text's logits are
    those it has alone (a causal model's positions never look right), and a model read from the disk layer
    by layer is read once per batch, not once per text. A tokenizer without a pad token batches too, and a
    cut text has the first logits of the whole one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora.merge import CHECK_PROMPTS, logits_of

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    alone = list(logits_of(model, tok, CHECK_PROMPTS, batch=1))
    tok.pad_token = None
    batched = list(logits_of(model, tok, CHECK_PROMPTS))
    assert [a.shape for a in batched] == [a.shape for a in alone] and len(set(a.shape for a in alone)) > 1
    assert max(float((a - b).abs().max()) for a, b in zip(batched, alone)) < 1e-5
    cut = list(logits_of(model, tok, CHECK_PROMPTS, max_tokens=4))
    assert [len(a) for a in cut] == [4] * len(CHECK_PROMPTS)
    assert max(float((a - b[:4]).abs().max()) for a, b in zip(cut, alone)) < 1e-5


def test_the_self_check_cuts_long_texts_at_check_max_tokens(tiny_run, tmp_path, capsys):
    """merge.check_max_tokens bounds the check's logits (a 128k vocabulary makes 0.5 MB of fp32 logits a
    token): each text is cut there, and the adapter model's logits, kept on the disk meanwhile, are gone."""
    run, _ = tiny_run
    out = tmp_path / "merged"
    assert main(["merge", f"adapter={run.run_dir}", f"output_dir={out}", "merge.dtype=float32",
                 "merge.check_prompts=3", "merge.check_max_tokens=6"]) == 0, capsys.readouterr().err
    report = json.loads((out / "merge_report.json").read_text())
    assert (report["prompts"], report["tokens"], report["top1_agreement"]) == (3, 18, 1.0), report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert main(["merge", f"adapter={run.run_dir}", f"output_dir={tmp_path / 'x'}", "merge.check_max_tokens=0"]) == 2
    assert "merge.check_max_tokens=0" in capsys.readouterr().err


def test_a_base_with_other_safetensors_beside_its_shards_merges_from_its_shards(tiny_model, tiny_data, tmp_path,
                                                                                 capsys):
    """Mistral v0.3's hub folder holds consolidated.safetensors beside its model-0000N-of-0000M shards: the same
    weights under Mistral's own names, which transformers never reads (the index names the shards). Merge and
    GGUF export read what the index names: the merged model held a second, unmerged copy of the weights, and
    GGUF export stopped on a traceback (Mistral's names map to llama.cpp's too: a tensor written twice)."""
    import shutil

    from safetensors.torch import load_file, save_file

    base = tmp_path / "mistral-like"
    shutil.copytree(tiny_model, base)
    weights = load_file(str(base / "model.safetensors"))
    (base / "model.safetensors").rename(base / "model-00001-of-00001.safetensors")
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in weights}}))
    mistral_names = [("model.embed_tokens", "tok_embeddings"), ("model.norm", "norm"), ("lm_head", "output"),
                     ("model.layers.", "layers."), ("self_attn.q_proj", "attention.wq"),
                     ("self_attn.k_proj", "attention.wk"), ("self_attn.v_proj", "attention.wv"),
                     ("self_attn.o_proj", "attention.wo"), ("mlp.gate_proj", "feed_forward.w1"),
                     ("mlp.down_proj", "feed_forward.w2"), ("mlp.up_proj", "feed_forward.w3"),
                     ("input_layernorm", "attention_norm"), ("post_attention_layernorm", "ffn_norm")]

    def mistral_name(key):
        for hf, theirs in mistral_names:
            key = key.replace(hf, theirs)
        return key

    save_file({mistral_name(k): v.clone() for k, v in weights.items()}, str(base / "consolidated.safetensors"))
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(base, tiny_data, run, **{"train.max_steps": 1,
                                                                    "eval.exact_match": "false"})]) == 0
    assert main(["merge", f"adapter={run}", f"output_dir={tmp_path / 'merged'}", "merge.dtype=float32"]) == 0
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert set(merged) == set(weights), sorted(set(merged) ^ set(weights))[:3]
    code = main(["export", f"model.name_or_path={base}", "export.format=gguf", f"output_dir={tmp_path / 'gguf'}"])
    assert code == 0, capsys.readouterr().err
