"""Vocabulary identity (fingerprints, token-by-token checks on fine-tune, resume and --vocab) and
GPT2-Chinese-compatible encoding with a BERT vocabulary, checked against transformers' BertTokenizer."""
import json
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from novelgpt import preparing
import train
from novelgpt.checkpoint import load_model
from configurator import UserError
from conftest import gpt2_chinese_folder
from novelgpt.engine import Engine, SamplingSettings
from model import GPT, GPTConfig
from novelgpt.tokenizer import Tokenizer

PARAGRAPH = ("　　宝玉笑道：“林妹妹，你今日可好些了？”黛玉冷笑道：“我好不好，与你何干！”说着，便转身进去了。\n"
             "　　第十二回，袭人拿了三十两银子……又说：“二爷——快些来罢！”\n")
MIXED = ("Hello World! The things 2024年 were Walking; café naïve ÉCOLE x\u200by 3.14159 "
         "ＡＢＣ１２３，１９９９年（全角）【书名】《红楼梦》～～ e-mail: a.b@c.com\ttab ^_^ $5 Ünïcode")
BERT_WORDS = ["the", "hello", "world", "thing", "walk", "cafe", "naive", "ecole", "com", "mail", "tab", "20", "19",
              "3", "14", "##s", "##ing", "##24", "##99", "##159", "##14", "##ode", "uni", "##c", "un"]


def bert_vocab_lines(text: str, size: int = 21128) -> list[str]:
    """A vocabulary shaped like bert-base-chinese / uer (21,128 lines): [PAD], [unused1-99], the specials,
    ASCII, the text's Chinese characters and punctuation, some wordpieces, then filler hanzi and ##hanzi."""
    lines = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "<S>", "<T>"]
    lines += [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    lines += [c for c in dict.fromkeys(text) if ord(c) > 127 and not c.isspace() and c not in "，１"]  # two [UNK]s
    lines = list(dict.fromkeys(lines + BERT_WORDS))
    seen, code = set(lines), 0x4E00
    while len(lines) < size:
        for candidate in (chr(code), "##" + chr(code)):
            if candidate not in seen and len(lines) < size:
                lines.append(candidate)
                seen.add(candidate)
        code += 1
    return lines


def transformers_ids(lines: list[str], text: str) -> list[int]:
    """What GPT2-Chinese's train.py feeds its model: BertTokenizer ids, a newline read as [SEP]."""
    from transformers import BertTokenizer
    bert = BertTokenizer(vocab=OrderedDict((t, i) for i, t in enumerate(lines)))  # vocab_file= ignores the file
    return bert(text.replace("\n", " [SEP] "), add_special_tokens=False)["input_ids"]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------ encoding

@pytest.mark.parametrize("text", [PARAGRAPH, MIXED, PARAGRAPH + MIXED + "\n[CLS]宝玉[SEP]hello"],
                         ids=["novel", "english-digits-fullwidth", "all-with-specials"])
def test_bert_vocabulary_encodes_as_gpt2_chinese(tmp_path, text):
    lines = bert_vocab_lines(PARAGRAPH + MIXED)
    tok = Tokenizer.from_vocab_file(write_lines(tmp_path / "vocab.txt", lines))
    assert tok.wordpiece and tok.vocab_size == 21128
    ours = tok.encode(text).tolist()
    assert ours == transformers_ids(lines, text)
    assert tok.unk_id in ours or text is PARAGRAPH  # the missing characters do become [UNK]
    assert tok.stoi["\u3000"] not in ours if "\u3000" in tok.stoi else True
    assert "[UNK]" not in [tok.itos[i] for i in tok.encode("　　宝玉笑道\n")]  # indent dropped, not [UNK]


def test_bert_encoding_of_a_long_text_matches_piece_by_piece(tmp_path):
    """The vectorized path (one table per code point) gives the same ids on a long text as on its parts."""
    lines = bert_vocab_lines(PARAGRAPH + MIXED)
    tok = Tokenizer.from_vocab_file(write_lines(tmp_path / "vocab.txt", lines))
    parts = [PARAGRAPH, MIXED + "\n", PARAGRAPH]
    whole = tok.encode("".join(parts)).tolist()
    assert whole == sum((tok.encode(p).tolist() for p in parts), [])
    assert whole == transformers_ids(lines, "".join(parts))


def test_our_character_vocabulary_keeps_every_character():
    tok = Tokenizer.build(Counter(PARAGRAPH + MIXED), vocab_size=13317)
    assert not tok.wordpiece
    ids = tok.encode("A a\n　x")
    assert [tok.itos[i] for i in ids] == ["A", " ", "a", "\n", "\u3000", "x"]
    assert tok.decode(tok.encode(PARAGRAPH + MIXED)) == PARAGRAPH + MIXED


# ------------------------------------------------------------------ fingerprints

def test_fingerprint_is_in_meta_json_and_in_checkpoints(tmp_path):
    (tmp_path / "novel.txt").write_text(PARAGRAPH * 40, encoding="utf-8")
    meta = preparing.prepare(str(tmp_path / "novel.txt"), "novel", vocab_size=300, block_size=16,
                           data_dir=str(tmp_path / "data"))
    on_disk = json.loads((tmp_path / "data" / "novel" / "meta.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_meta(on_disk)
    assert on_disk["fingerprint"] == meta["fingerprint"] == tok.fingerprint and len(tok.fingerprint) == 16
    assert Tokenizer(tok.itos[:5] + [tok.itos[6], tok.itos[5]] + tok.itos[7:]).fingerprint != tok.fingerprint
    damaged = dict(on_disk, itos=list(reversed(on_disk["itos"])))
    with pytest.raises(ValueError, match="fingerprint"):
        Tokenizer.from_meta(damaged)
    config = dict(train.DEFAULTS, dataset="novel", data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "out"),
                  n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2, gradient_accumulation_steps=1,
                  max_iters=1, eval_interval=1, eval_iters=1, device="cpu", dtype="float32", compile=False)
    train.train(config)
    checkpoint = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert checkpoint["vocab"]["fingerprint"] == tok.fingerprint


# ------------------------------------------------------------------ mismatches refused, matches pass

@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """Two novels, each with its own 13,317-token vocabulary (the same size, other ids), and a run on the first."""
    root = tmp_path_factory.mktemp("vocab")
    (root / "a.txt").write_text(PARAGRAPH * 40, encoding="utf-8")
    (root / "b.txt").write_text(("黛玉叹道：“罢了。”\n" + PARAGRAPH) * 40, encoding="utf-8")
    for name in ("a", "b"):
        preparing.prepare(str(root / f"{name}.txt"), name, block_size=16, data_dir=str(root / "data"))
    config = tiny_config(root, "a", root / "run")
    train.train(config)
    return root


def tiny_config(root: Path, name: str, out_dir: Path, **overrides) -> dict:
    config = dict(train.DEFAULTS, dataset=name, data_dir=str(root / "data"), out_dir=str(out_dir), n_layer=1,
                  n_head=2, n_embd=16, block_size=16, batch_size=2, gradient_accumulation_steps=1, max_iters=2,
                  eval_interval=2, eval_iters=1, device="cpu", dtype="float32", compile=False, dropout=0.1)
    config.update(overrides)
    return config


@pytest.mark.slow
def test_same_size_other_vocabulary_is_refused_on_fine_tune(two_datasets, tmp_path):
    root = two_datasets
    a = Tokenizer.from_vocab_file(root / "data" / "a" / "vocab.txt")
    b = Tokenizer.from_vocab_file(root / "data" / "b" / "vocab.txt")
    assert a.vocab_size == b.vocab_size == 13317 and a.itos != b.itos
    folder = tmp_path / "final_model"
    gpt2_chinese_folder(GPT(GPTConfig(block_size=32, vocab_size=13317, n_layer=1, n_head=2, n_embd=16)), folder)
    (folder / "vocab.txt").write_text(a.vocab_file_text(), encoding="utf-8")
    with pytest.raises(UserError, match=r"does not match .*python prepare\.py .*b\.txt --dataset b --vocab "
                                        rf"{folder}/vocab\.txt$"):
        train.train(tiny_config(root, "b", tmp_path / "out_b", init_from=str(folder)))
    result = train.train(tiny_config(root, "a", tmp_path / "out_a", init_from=str(folder)))
    assert result["iter_num"] == 2
    assert torch.load(tmp_path / "out_a" / "ckpt.pt", weights_only=True)["model_args"]["dropout"] == 0.1
    (folder / "vocab.txt").unlink()  # a folder without vocab.txt cannot share a vocabulary built from a text
    with pytest.raises(UserError, match="no vocab.txt.*--vocab <the model vocab.txt>"):
        train.train(tiny_config(root, "a", tmp_path / "out_c", init_from=str(folder)))


@pytest.mark.slow
def test_resume_on_another_vocabulary_is_refused(two_datasets):
    root = two_datasets
    with pytest.raises(UserError, match=r"does not match .*--dataset=a\)$"):
        train.train(tiny_config(root, "b", root / "run", init_from="resume", max_iters=4))


@pytest.mark.slow
def test_sampling_with_another_vocab_file_is_refused(two_datasets, tmp_path):
    root = two_datasets
    model, tok, _ = load_model(str(root / "run"), vocab=str(root / "data" / "a" / "vocab.txt"))
    assert tok.itos == Tokenizer.from_vocab_file(root / "data" / "a" / "vocab.txt").itos
    with pytest.raises(UserError, match="first difference at id .*leave --vocab out"):
        load_model(str(root / "run"), vocab=str(root / "data" / "b" / "vocab.txt"))
    folder = tmp_path / "exported"
    gpt2_chinese_folder(model, folder)
    (folder / "vocab.txt").write_text(tok.vocab_file_text(), encoding="utf-8")
    assert load_model(str(folder), vocab=str(root / "data" / "a" / "vocab.txt"))[1].itos == tok.itos
    with pytest.raises(UserError, match="the folder's vocab.txt is its vocabulary"):
        load_model(str(folder), vocab=str(root / "data" / "b" / "vocab.txt"))


# ------------------------------------------------------------------ document markers

def test_uer_folder_wraps_documents_in_cls_and_sep_and_ends_on_sep(tmp_path):
    """A folder that names BertTokenizer and has no real bos/eos ids (uer's hub models) is [CLS] text [SEP]."""
    lines = bert_vocab_lines(PARAGRAPH, size=400)
    folder = tmp_path / "uer"
    model = GPT(GPTConfig(block_size=32, vocab_size=400, n_layer=1, n_head=2, n_embd=16))
    gpt2_chinese_folder(model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, tokenizer_class="BertTokenizer", eos_token_id=50256)))
    write_lines(folder / "vocab.txt", lines)
    (tmp_path / "n.txt").write_text(PARAGRAPH * 10, encoding="utf-8")
    meta = preparing.prepare(str(tmp_path / "n.txt"), "n", vocab=str(folder / "vocab.txt"), block_size=16,
                           data_dir=str(tmp_path / "data"))
    assert (meta["doc_start"], meta["doc_end"]) == ("[CLS]", "[SEP]")
    assert meta["hf_metadata"] == {"tokenizer_class": "BertTokenizer"}
    ids = np.fromfile(tmp_path / "data" / "n" / "train.bin", dtype=np.uint16)
    assert ids[0] == lines.index("[CLS]")
    tok = Tokenizer.from_meta(meta)
    with torch.no_grad():  # a model that always says [SEP] (constant final features): the sample ends at once
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tok.eos_id, 0] = 50.0
    pieces = list(Engine(model).stream_text(tok, "宝玉", SamplingSettings(max_new_tokens=5, seed=1)))
    assert pieces == []
    assert len(list(Engine(model).stream_text(tok, "宝玉", SamplingSettings(max_new_tokens=5, ignore_eos=True)))) == 5
