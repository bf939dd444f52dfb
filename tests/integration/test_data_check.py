"""`qlora data check`, and training refusing data that would teach the model never to stop."""
import json

from qlora.cli import main
from tests.conftest import tiny_overrides

NO_END_OF_TURN = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
                  "{% if m['role'] != 'assistant' %}{{ '<|im_end|>\n' }}{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def check_args(tiny_model, tiny_data, out, **extra):
    keep = ("model.", "data.", "train.max_length", "output_dir")
    return [a for a in tiny_overrides(tiny_model, tiny_data, out, **extra) if a.startswith(keep)]


def test_data_check_shows_trained_tokens_and_audits(tiny_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "dc"
    assert main(["data", "check", *check_args(tiny_model, tiny_data, out)]) == 0
    text = capsys.readouterr().out
    assert '[[{"name": ' in text and '<|im_end|>]]' in text  # trained span marked, EOS inside it
    assert "no fatal finding" in text
    report = json.loads((out / "data_check.json").read_text())
    assert report["examples"] == 24 and report["assistant_turns"] == 24 and report["fatal"] == []
    assert (out / "lengths.png").is_file()


def test_a_template_without_a_trained_end_of_turn_is_fatal(tiny_model, tiny_data, tmp_path, capsys):
    template = tmp_path / "t.jinja"
    template.write_text(NO_END_OF_TURN)
    extra = {"model.chat_template": template}
    assert main(["data", "check", *check_args(tiny_model, tiny_data, tmp_path / "dc", **extra)]) == 2
    assert "do not end in a trained end-of-turn token" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(tiny_model, tiny_data, run, **extra)]) == 2
    assert "generation would not stop" in capsys.readouterr().err
    assert not run.exists()
