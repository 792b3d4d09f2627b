"""export.py: a folder built by transformers is fine-tuned here, exported, and read back by transformers
(GPT2LMHeadModel, AutoTokenizer, pipeline) with the same logits and the same token ids; sharded folders load."""
import json
import logging
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from novelgpt import preparing
import export
import train
from novelgpt.checkpoint import load_model
from novelgpt.hf import load_hf_gpt2
from test_vocab import MIXED, PARAGRAPH, bert_vocab_lines, write_lines
from novelgpt.tokenizer import Tokenizer

TEXT = (PARAGRAPH + "　　Hello World! ABC abc 2024年，第12章。\n") * 30


def transformers_folder(folder: Path, vocab_size: int, seed: int = 0, **config) -> None:
    """A small random GPT-2 saved by transformers itself."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                               **config)).save_pretrained(folder)


class Complaints:
    """Python warnings and transformers' log records at WARNING or above, collected while active."""

    def __enter__(self) -> list[str]:
        from transformers.utils import logging as hf_logging
        self.messages: list[str] = []
        self.catch = warnings.catch_warnings(record=True)
        self.caught = self.catch.__enter__()
        warnings.simplefilter("always")
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda record: self.messages.append(record.getMessage())
        self.logger = hf_logging.get_logger()
        self.logger.addHandler(self.handler)
        return self.messages

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self.handler)
        self.catch.__exit__(*exc)
        self.messages.extend(str(w.message) for w in self.caught)


@pytest.fixture(scope="module", params=["ours", "bert"])
def fine_tuned(request, tmp_path_factory):
    """A transformers folder (13,317 tokens of our vocabulary, or a 21,128-token uer-style BERT vocabulary),
    a dataset prepared with its vocab.txt, and a few fine-tuning iterations from it: (root, tokenizer)."""
    root = tmp_path_factory.mktemp(request.param)
    folder = root / "pretrained"
    if request.param == "ours":
        tok = Tokenizer.build(Counter(TEXT + MIXED), vocab_size=13317)
        transformers_folder(folder, tok.vocab_size)
        (folder / "vocab.txt").write_text(tok.vocab_file_text(), encoding="utf-8")
    else:
        lines = bert_vocab_lines(TEXT + MIXED)
        transformers_folder(folder, len(lines), tokenizer_class="BertTokenizer")  # as uer's hub folders say
        write_lines(folder / "vocab.txt", lines)
    (root / "novel.txt").write_text(TEXT, encoding="utf-8")
    preparing.prepare(str(root / "novel.txt"), "novel", vocab=str(folder / "vocab.txt"), block_size=32,
                    data_dir=str(root / "data"))
    config = dict(train.DEFAULTS, dataset="novel", data_dir=str(root / "data"), out_dir=str(root / "out"),
                  init_from=str(folder), block_size=32, batch_size=2, gradient_accumulation_steps=1, max_iters=3,
                  eval_interval=3, eval_iters=1, device="cpu", dtype="float32", compile=False, dropout=0.1)
    assert train.train(config)["iter_num"] == 3
    return root, load_model(str(root / "out"))[1]


@pytest.mark.slow
def test_export_reloads_in_transformers_with_equal_logits_and_ids(fine_tuned):
    from transformers import AutoTokenizer, GPT2LMHeadModel, pipeline
    root, tok = fine_tuned
    export.main([str(root / "out"), str(root / "exported")])
    names = sorted(p.name for p in (root / "exported").iterdir())
    assert {"config.json", "generation_config.json", "model.safetensors", "pytorch_model.bin", "vocab.txt",
            "tokenizer_config.json", "special_tokens_map.json"} <= set(names)
    ours, _, _ = load_model(str(root / "out"))
    with Complaints() as complaints:
        model = GPT2LMHeadModel.from_pretrained(root / "exported").eval()
        hf_tok = AutoTokenizer.from_pretrained(root / "exported")
        generated = pipeline("text-generation", model=model, tokenizer=hf_tok)("宝玉笑道", max_new_tokens=8)
    assert complaints == []
    assert generated[0]["generated_text"].startswith("宝玉笑道")
    text = PARAGRAPH + MIXED + "\n宝玉"
    if tok.wordpiece:  # BertTokenizer, as GPT2-Chinese uses it: no [CLS]/[SEP] around, a newline is [SEP]
        hf_ids = hf_tok(text.replace("\n", " [SEP] "), add_special_tokens=False)["input_ids"]
    else:  # our characters exactly: newline, space, U+3000 and capitals are tokens of their own
        hf_ids = hf_tok(text)["input_ids"]
        assert hf_tok.decode(hf_ids) == text
    ids = tok.encode(text)
    assert hf_ids == ids.tolist()
    x = torch.as_tensor(ids[:32])[None]  # (1, 32)
    with torch.no_grad():
        difference = (model(x).logits - ours(x, x)[0]).abs().max().item()
    assert difference < 1e-5
    config = json.loads((root / "exported" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (tok.bos_id, tok.eos_id,
                                                                                         tok.pad_id)
    assert model.generation_config.eos_token_id == tok.eos_id
    if tok.wordpiece:  # the source folder's tokenizer_class came through fine-tuning and export
        assert config["tokenizer_class"] == "BertTokenizer"
        assert type(hf_tok).__name__.startswith("BertTokenizer")
        assert (tok.doc_start, tok.doc_end) == ("[CLS]", "[SEP]")  # uer's wrapping, from the folder


@pytest.mark.slow
def test_bin_only_export_loads_and_matches(fine_tuned):
    from transformers import GPT2LMHeadModel
    root, tok = fine_tuned
    export.main([str(root / "out" / "ckpt.pt"), str(root / "bin_only"), "--format", "bin"])
    assert not (root / "bin_only" / "model.safetensors").exists()
    assert (root / "bin_only" / "pytorch_model.bin").read_bytes()[:2] != b"PK"  # the pre-1.6 format, not a zip
    model = GPT2LMHeadModel.from_pretrained(root / "bin_only").eval()
    ours, _, _ = load_model(str(root / "bin_only"))  # and our own loader reads the exported folder back
    x = torch.as_tensor(tok.encode(PARAGRAPH)[:32])[None]
    with torch.no_grad():
        assert (model(x).logits - ours(x, x)[0]).abs().max().item() < 1e-5
    again, tok_again, _ = load_model(str(root / "bin_only"))
    assert tok_again.itos == tok.itos and (tok_again.doc_start, tok_again.doc_end) == (tok.doc_start, tok.doc_end)


@pytest.mark.slow
def test_export_replaces_only_an_exported_folder(fine_tuned, capsys):
    root, _ = fine_tuned
    target = root / "keep"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as info:
        export.main([str(root / "out"), str(target)])
    assert info.value.code == 2 and "notes.txt" in capsys.readouterr().err
    assert (target / "notes.txt").read_text() == "mine"
    for argv in ([str(root / "out")], [str(root / "out"), str(root / "x"), "--format=onnx"]):
        with pytest.raises(SystemExit) as info:
            export.main(argv)
        assert info.value.code == 2 and capsys.readouterr().err.startswith("error: ")
    export.main([str(root / "out"), str(root / "twice"), "--format=safetensors"])
    export.main([str(root / "out"), str(root / "twice"), "--format=bin"])  # an export replaces an export whole
    assert sorted(p.name for p in (root / "twice").glob("*.bin")) == ["pytorch_model.bin"]
    assert not (root / "twice" / "model.safetensors").exists()


def test_sharded_safetensors_load(tmp_path):
    from transformers import GPT2LMHeadModel
    transformers_folder(tmp_path / "whole", 500)
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "whole").eval()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("model-0000*-of-0000*.safetensors"))) > 1
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ours = load_hf_gpt2(str(tmp_path / "sharded")).eval()
    x = torch.randint(0, 500, (2, 16))
    with torch.no_grad():
        assert (model(x).logits - ours(x, x)[0]).abs().max().item() < 1e-5
    next((tmp_path / "sharded").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ValueError, match="shard"):
        load_hf_gpt2(str(tmp_path / "sharded"))
