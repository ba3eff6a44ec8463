"""The command line: info without allocation, generate/convert/chat on a small saved model, clear errors."""

from __future__ import annotations

import json

import pytest
from helpers import save_tiny_model, tiny_config

from mixtral.cli import main
from mixtral.text.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("cli") / "model")


def test_info_8x7b_counts(capsys):
    assert main(["info", "mixtral-8x7b"]) == 0
    out = capsys.readouterr().out
    assert "46,702,792,704" in out and "12,879,925,248" in out
    assert "4.0 GiB" in out  # KV cache of one 32k sequence in bf16
    assert main(["info", "mixtral-8x7b", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total_params"] == 46_702_792_704 and report["active_params"] == 12_879_925_248
    assert report["kv_cache_bytes_per_token"]["bf16"] == 131_072


def test_info_on_checkpoint(model_dir, capsys):
    assert main(["info", str(model_dir)]) == 0
    assert f"{tiny_config(vocab_size=32000).total_params:,}" in capsys.readouterr().out


def test_generate_json_and_stream(model_dir, capsys):
    assert main(["generate", str(model_dir), "Hello", "--max-new-tokens", "6", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["token_ids"]) == 6 and record["prefill_tokens_per_s"] > 0 and "text" in record
    assert main(["generate", str(model_dir), "Hello", "--max-new-tokens", "6", "--stream"]) == 0
    streamed = capsys.readouterr().out
    assert streamed.strip() == ("Hello" + record["text"]).strip()


def test_convert_round_trip(model_dir, tmp_path, capsys):
    assert main(["convert", str(model_dir), str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "params.json").exists()
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "h")]) == 0
    assert (tmp_path / "h" / "config.json").exists()
    assert main(["generate", str(tmp_path / "h"), "Hi", "--max-new-tokens", "4", "--json"]) == 0


def test_chat_reads_turns_from_stdin(model_dir, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nAnd again\n"))
    assert main(["chat", str(model_dir), "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["generate", "/nonexistent/model", "hi"], "does not exist"),
        (["info", "mixtral-9x9b"], "neither a preset"),
        (["generate", "{model}", "hi", "--temperature", "-1"], "temperature"),
        (["generate", "{model}", "hi", "--top-p", "2"], "top_p"),
        (["generate", "{model}", "hi", "--max-new-tokens", "5000"], "context"),
        (["convert", "{empty}", "{empty}/out"], "{empty}"),
    ],
)
def test_errors_are_one_line(argv, match, model_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = [a.format(model=model_dir, empty=tmp_path / "empty") for a in argv]
    match = match.format(empty=tmp_path / "empty")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and match in err[0]


def test_bad_flag_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate"])
    assert e.value.code == 2


def test_generate_quantized_and_compiled_options(model_dir, capsys):
    assert (
        main(["generate", str(model_dir), "Hello", "--max-new-tokens", "4", "--json", "--quantize", "int8"])
        == 0
    )
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 4
    assert (
        main(["generate", str(model_dir), "Hello", "--max-new-tokens", "4", "--json", "--quantize", "bf16"])
        == 0
    )
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 4


def test_generate_bf16_model_quantized_with_a_long_prompt(model_dir, capsys):
    """--dtype bf16 --quantize int8: a prompt over 32 tokens prefills through the sorted path, which
    dequantises to bf16 (it once crashed there on a dtype mismatch)."""
    prompt = " ".join(["the model reads a long prompt"] * 12)
    args = ["generate", str(model_dir), prompt, "--max-new-tokens", "3", "--json", "--dtype", "bf16"]
    assert main([*args, "--quantize", "int8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_tokens"] > 32 and len(out["token_ids"]) == 3


def test_quantize_reports_quality_and_speed(model_dir, capsys):
    assert main(["quantize", str(model_dir), "--ppl-tokens", "0", "--new-tokens", "3"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["storage"] == "int8" and 0 <= report["max_abs_logit_err"] < 1.0
    assert report["decode_tok_s"]["int8"] > 0


def test_convert_to_gguf(model_dir, tmp_path, capsys):
    pytest.importorskip("gguf")
    assert (
        main(["convert", str(model_dir), str(tmp_path / "m.gguf"), "--to", "gguf", "--outtype", "q8_0"]) == 0
    )
    assert (tmp_path / "m.gguf").stat().st_size > 0


def test_train_list_and_bad_override(capsys):
    assert main(["train", "--list"]) == 0
    assert "mini-dense" in capsys.readouterr().out
    assert main(["train", "--recipe", "test", "--set", "train.lr=fast"]) == 2
    assert "expected float" in capsys.readouterr().err


def test_demo_on_a_given_model(model_dir, tmp_path, capsys):
    assert main(["demo", "--model", str(model_dir), "--max-new-tokens", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "-- code" in out and "-- fr" in out and "46,702,792,704" in out
    assert "same 1st" in out and (tmp_path / "routing" / "report.html").exists()


def test_train_command_on_user_files(tmp_path, capsys):
    (tmp_path / "code.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    (tmp_path / "fr.jsonl").write_text("".join(json.dumps({"text": f"Bonjour numéro {i}, ça va bien."}) + "\n"
                                               for i in range(30)))  # fmt: skip
    argv = ["train", "--recipe", "test", "--out", str(tmp_path / "run"), "--set", "train.steps=4",
            "--set", f"data.inputs=code={tmp_path / 'code.txt'},fr={tmp_path / 'fr.jsonl'}",
            "--set", "data.vocab_size=300"]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "run" / "model" / "config.json").exists() and (tmp_path / "run" / "curve.png").exists()
    assert "held-out loss" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_train_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--train", "--out", str(tmp_path / "demo"), "--max-new-tokens", "8"]) == 0
    assert "trained in" in capsys.readouterr().out


def test_tokenizer_train_command(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("le chat est sur la table. " * 200 + "def f(x): return x\n" * 100)
    assert (
        main(
            [
                "tokenizer",
                "train",
                str(tmp_path / "tok"),
                "--vocab-size",
                "320",
                "--input",
                str(tmp_path / "a.txt"),
            ]
        )
        == 0
    )
    assert "320-piece" in capsys.readouterr().out
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.vocab_size == 320 and tok.decode(tok.encode("le chat 🐱")) == "le chat 🐱"
