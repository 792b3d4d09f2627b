"""engine.py's decoding loop against a mock model whose next token is known: the prefill, the one-token steps
through the cache, the window slide, stop and banned ids, and the text stream. No model is trained here."""

from dataclasses import fields

import pytest
import torch
from torch import nn

from novelgpt.engine import Engine, SamplingSettings
from model import GPT, GPTConfig
from novelgpt.tokenizer import Tokenizer

ITOS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "甲", "乙", "丙", "丁", "戊", "己", "庚", "辛", "壬", "癸"]


class Successor(nn.Module):
    """A stand-in for GPT: after token t it likes t + 1 best, then t + 2, and so on round the vocabulary.

    It records each call's positions, and reads nothing from the cache: the last token decides alone."""

    def __init__(self, vocab_size: int = len(ITOS), block_size: int = 8):
        super().__init__()
        self.config = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=1, n_head=1, n_embd=2)
        self.lm_head = nn.Linear(2, vocab_size, bias=False)
        self.transformer = nn.ModuleDict({"wte": nn.Embedding(vocab_size, 2)})
        self.positions: list[list[int]] = []
        self.rows: list[int] = []  # the batch of each call

    def forward(self, idx: torch.Tensor, cache=None, pos: torch.Tensor | None = None):
        assert cache is not None and pos is not None and pos.numel() == idx.size(1)
        self.positions.append(pos.tolist())
        self.rows.append(idx.size(0))
        V = self.config.vocab_size
        ids = torch.arange(V)
        logits = -((ids[None, None, :] - idx[:, :, None] - 1) % V).float()  # (B, T, V): 0 for t + 1, -1 for t + 2
        return logits, None


def test_greedy_steps_follow_the_model_and_the_window_slides_at_block_size():
    model = Successor(vocab_size=40, block_size=8)
    steps = list(Engine(model).stream(torch.tensor([[1, 2, 3]]), 12, temperature=0))
    assert [s.item() for s in steps] == list(range(4, 16))
    # one prefill of the prompt, one position per step until the 8 slots are full, then a rebuild from the
    # recent half (4 tokens) and single steps again
    assert model.positions[0] == [0, 1, 2]
    assert model.positions[1:6] == [[3], [4], [5], [6], [7]]
    assert model.positions[6] == [0, 1, 2, 3]
    assert model.positions[7:] == [[4], [5], [6], [7], [0, 1, 2, 3]]  # the last token needs no forward pass


def test_a_stopped_row_yields_minus_one_and_the_stream_ends_when_all_rows_have_stopped():
    model = Successor(vocab_size=40, block_size=16)
    steps = torch.stack(list(Engine(model).stream(torch.tensor([[1], [5]]), 10, temperature=0, stop_ids=[4, 9])))
    assert steps[:, 0].tolist() == [2, 3, 4, -1]
    assert steps[:, 1].tolist() == [6, 7, 8, 9]
    one_row = list(Engine(model).stream(torch.tensor([[1]]), 10, temperature=0, stop_ids=[30]))
    assert len(one_row) == 10  # no stop id reached: max_new_tokens ends it


def test_banned_ids_give_the_next_best_token():
    steps = Engine(Successor(vocab_size=40)).stream(torch.tensor([[2]]), 3, temperature=0, banned_ids=[3, 5])
    assert [s.item() for s in steps] == [4, 6, 7]


def test_seeded_sampling_repeats_and_stays_in_the_top_k():
    engine = Engine(Successor(vocab_size=40, block_size=64))

    def run(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        steps = engine.stream(torch.tensor([[0]]), 30, temperature=5.0, top_k=3, generator=generator)
        return [s.item() for s in steps]

    first, again, other = run(1), run(1), run(2)
    assert first == again and first != other
    previous = [0] + first[:-1]
    assert all((token - last) % 40 in (1, 2, 3) for last, token in zip(previous, first))
    assert len({(token - last) % 40 for last, token in zip(previous, first)}) == 3  # all three are drawn


def test_stream_text_decodes_each_row_and_ends_a_sample_at_end_of_text():
    tok = Tokenizer(ITOS)
    engine = Engine(Successor())
    pieces = list(engine.stream_text(tok, "辛", SamplingSettings(max_new_tokens=20, temperature=0, num_samples=2)))
    # 辛 -> 壬 -> 癸 -> [PAD] and [UNK] are banned -> [CLS], the end of text, which ends both samples unseen
    assert pieces == [(0, "壬"), (1, "壬"), (0, "癸"), (1, "癸")]
    text = "".join(p for _, p in engine.stream_text(tok, "辛", SamplingSettings(max_new_tokens=5, temperature=0,
                                                                                  ignore_eos=True)))
    assert text.startswith("壬癸") and len(text) > 2  # ignore_eos writes on past it


@pytest.mark.parametrize("call, message", [
    (lambda e: list(e.stream(torch.tensor([[len(ITOS)]]), 3)), "token ids must be in"),
    (lambda e: list(e.stream(torch.zeros(1, 0, dtype=torch.long), 3)), "at least one token"),
    (lambda e: list(e.stream(torch.tensor([[5]]), 3, top_p=0.0)), "0 < top_p <= 1"),
    (lambda e: list(e.stream_text(Tokenizer(ITOS), "甲", SamplingSettings(top_k=-1))), "top_k must be 0"),
    (lambda e: list(e.stream_text(Tokenizer(ITOS), "", SamplingSettings())), "empty prompt"),
])
def test_bad_prompts_and_settings_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call(Engine(Successor()))


def test_the_prompt_is_read_once_and_its_cache_copied_to_every_sample():
    model = Successor(vocab_size=40, block_size=16)
    steps = list(Engine(model).stream(torch.tensor([[1, 2, 3], [7, 8, 9]]), 4, temperature=0, copies=3))
    assert model.rows[0] == 2 and model.positions[0] == [0, 1, 2]  # one pass over the two prompts
    assert model.rows[1:] == [6, 6, 6]  # then each of the 6 rows steps on its own copy of the cache
    assert [s.tolist() for s in steps] == [[4, 4, 4, 10, 10, 10], [5, 5, 5, 11, 11, 11], [6, 6, 6, 12, 12, 12],
                                           [7, 7, 7, 13, 13, 13]]


def test_copied_prompt_cache_gives_the_logits_of_reading_it_in_every_row():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=16, vocab_size=len(ITOS), n_layer=2, n_head=2, n_embd=16))
    prompt = torch.tensor([[5, 6, 7, 8]])
    copied = torch.stack(list(Engine(gpt).stream(prompt, 6, temperature=0, copies=3)))
    each = torch.stack(list(Engine(gpt).stream(prompt.repeat(3, 1), 6, temperature=0)))
    assert torch.equal(copied, each)


def test_every_sampling_option_is_an_option_of_sample_py_serve_py_and_the_request():
    from novelgpt import gpt2chinese_generate
    from novelgpt import hf
    import sample
    import serve
    names = {f.name for f in fields(SamplingSettings)} - {"seed"}  # each script has its own seed option
    assert names <= set(sample.DEFAULTS) and names <= set(serve.DEFAULTS)
    for name in names:
        assert sample.DEFAULTS.explanations[name] == serve.DEFAULTS.explanations[name]
    body = serve.request_model(serve.Limits(), 100, SamplingSettings()).model_fields
    assert set(body) == {"prompt", "seed"} | names - {"ignore_eos"}  # the server's --ignore_eos holds for all
    top_k = SamplingSettings().top_k
    assert sample.DEFAULTS["top_k"] == serve.DEFAULTS["top_k"] == gpt2chinese_generate.GENERATE_FLAGS["topk"].default == top_k
    assert hf.generation_config_dict(Tokenizer(ITOS))["top_k"] == top_k
