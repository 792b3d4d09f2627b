"""model.py: equivalence with Hugging Face GPT-2, checkpoint import/export, KV-cache decoding, sampling, training."""

import json
import math
import os

import pytest
import torch

import transformers  # test-only dependency, requirements-dev.txt
from conftest import gpt2_chinese_folder
from model import GPT, GPTConfig, KVCache
from novelgpt.engine import Engine, sample_next
from novelgpt.hf import load_hf_gpt2
from novelgpt.tokenizer import DEFAULT_VOCAB_SIZE
from novelgpt.optim import OptimizerSettings, make_optimizers
from novelgpt.runtime import peak_flops_for

TINY = dict(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=16)


def tiny_model(seed: int = 2) -> GPT:
    """A tiny random GPT whose greedy output is varied and depends on the context.

    With tied embeddings a random model keeps predicting the token it just read; a negative final
    LayerNorm gain turns that around, so greedy decoding wanders instead of repeating one token."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**TINY)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
        model.transformer.ln_f.weight.neg_().sub_(1.0)
    return model


def hf_tiny(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                     initializer_range=0.3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random LayerNorm parameters and biases too, so every weight is checked
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.normal_(0.0, 0.3)
    return model


def save_like_gpt2_chinese(hf_model, path: str) -> None:
    """Write the folder as GPT2-Chinese's transformers 2.x did: pytorch_model.bin with the attention-mask
    buffers and lm_head.weight, and a config.json with both n_ctx and n_positions."""
    os.makedirs(path)
    cfg = hf_model.config
    state = {k: v.clone() for k, v in hf_model.state_dict().items()}
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    for i in range(cfg.n_layer):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(cfg.n_positions, cfg.n_positions))[None, None]
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    # the pre-1.6 torch.save format of GPT2-Chinese's era
    torch.save(state, os.path.join(path, "pytorch_model.bin"), _use_new_zipfile_serialization=False)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(initializer_range=0.02, layer_norm_epsilon=cfg.layer_norm_epsilon, n_ctx=cfg.n_positions,
                       n_embd=cfg.n_embd, n_head=cfg.n_head, n_layer=cfg.n_layer, n_positions=cfg.n_positions,
                       vocab_size=cfg.vocab_size), f)


def full_logits(model, idx: torch.Tensor) -> torch.Tensor:
    """All positions' logits from our model (forward with dummy targets computes them all)."""
    logits, _ = model(idx, torch.zeros_like(idx))
    return logits


# ------------------------------------------------------------------ Hugging Face equivalence

@pytest.mark.parametrize("fmt", ["bin", "safetensors", "bare GPT2Model"])
def test_loads_hf_gpt2_with_identical_logits(tmp_path, fmt):
    hf = hf_tiny()
    folder = str(tmp_path / "final_model")
    if fmt == "bin":
        save_like_gpt2_chinese(hf, folder)
    elif fmt == "safetensors":
        hf.save_pretrained(folder)
        assert os.path.exists(os.path.join(folder, "model.safetensors"))
    else:  # the transformer without its head: weight names lack the "transformer." prefix
        hf.transformer.save_pretrained(folder)
    ours = load_hf_gpt2(folder).eval()
    assert ours.config.block_size == 32 and ours.config.vocab_size == 97
    idx = torch.randint(0, 97, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
        got = full_logits(ours, idx)
        last, _ = ours(idx)
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero numbers
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, expected[:, -1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("safe", [True, False])
def test_saved_model_loads_in_transformers_with_identical_logits(tmp_path, safe):
    ours = tiny_model()
    gpt2_chinese_folder(ours, tmp_path, "safetensors" if safe else "bin")
    expected_file = "model.safetensors" if safe else "pytorch_model.bin"
    assert sorted(os.listdir(tmp_path)) == sorted(["config.json", expected_file])
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, full_logits(ours, idx), atol=1e-5, rtol=1e-5)
    # and back again
    again = load_hf_gpt2(str(tmp_path))
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_bad_hf_folders_give_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_hf_gpt2(str(tmp_path))
    folder = str(tmp_path / "m")
    save_like_gpt2_chinese(hf_tiny(), folder)
    os.remove(os.path.join(folder, "pytorch_model.bin"))
    with pytest.raises(ValueError, match="neither model.safetensors nor pytorch_model.bin"):
        load_hf_gpt2(folder)

    # weights that do not fit config.json
    save_like_gpt2_chinese(hf_tiny(), str(tmp_path / "shape"))
    with open(tmp_path / "shape" / "config.json") as f:
        cfg = json.load(f)
    cfg["vocab_size"] = 50
    with open(tmp_path / "shape" / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"transformer\.wte\.weight has shape \(97, 16\)"):
        load_hf_gpt2(str(tmp_path / "shape"))

    # weights of something that is not GPT-2
    folder = str(tmp_path / "extra")
    save_like_gpt2_chinese(hf_tiny(), folder)
    state = torch.load(os.path.join(folder, "pytorch_model.bin"), weights_only=True)
    state["transformer.h.0.attn.q_proj.weight"] = torch.zeros(16, 16)
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    with pytest.raises(ValueError, match=r"unknown weights \['transformer\.h\.0\.attn\.q_proj\.weight'\]") as e:
        load_hf_gpt2(folder)
    assert "\n" not in str(e.value)

    # a file that is not a checkpoint
    with open(os.path.join(folder, "pytorch_model.bin"), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read the weights"):
        load_hf_gpt2(folder)

    # a pickle that would run code on loading is refused, and the code is not run
    marker = tmp_path / "code_ran"
    state = {"transformer.wte.weight": RunsCodeWhenUnpickled(str(marker))}
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    with pytest.raises(ValueError, match="cannot read the weights"):
        load_hf_gpt2(folder)
    assert not marker.exists()


class RunsCodeWhenUnpickled:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path,)


def test_bad_input_gives_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="longer than block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\)"):
        Engine(model).generate(torch.tensor([[-1, 3]]), 2)
    with pytest.raises(ValueError, match="at least one token"):
        Engine(model).generate(torch.zeros(2, 0, dtype=torch.long), 2)
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5), dict(repetition_penalty=0.0)):
        with pytest.raises(ValueError, match="sampling needs"):
            Engine(model).generate(torch.tensor([[1, 2]]), 2, **bad)


# ------------------------------------------------------------------ KV-cache decoding

def greedy_without_cache(model: GPT, idx: torch.Tensor, steps: int) -> torch.Tensor:
    """Full forward over the whole window at every step, with the same sliding rule as generate."""
    block_size = model.config.block_size
    window, new = idx[:, -block_size:], []
    for _ in range(steps):
        logits, _ = model(window)
        token = logits[:, -1].argmax(dim=-1)
        new.append(token)
        window = torch.cat([window, token[:, None]], dim=1)
        if window.size(1) > block_size:
            window = window[:, -(block_size // 2):]
    return torch.stack(new, dim=1)


def test_cached_greedy_equals_uncached_also_across_the_slide():
    model = tiny_model()
    prompt = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(3))
    steps = 70  # the window of 32 fills and slides three times
    got = Engine(model).generate(prompt, steps, temperature=0)
    assert got.shape == (3, 20 + steps) and torch.equal(got[:, :20], prompt)
    expected = greedy_without_cache(model, prompt, steps)
    assert len(set(expected.flatten().tolist())) > 6  # a varied sequence, not one repeated token
    assert torch.equal(got[:, 20:], expected)
    # a prompt longer than block_size keeps its last block_size tokens
    long_prompt = torch.randint(0, 97, (1, 50), generator=torch.Generator().manual_seed(4))
    expected = greedy_without_cache(model, long_prompt, 5)
    assert torch.equal(Engine(model).generate(long_prompt, 5, temperature=0)[:, 50:], expected)


def test_cached_steps_give_the_logits_of_a_full_forward():
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = full_logits(model, tokens)
        cache = KVCache(model.config, 2, tokens.device, torch.float32)
        got = [model(tokens[:, :10], cache=cache, pos=torch.arange(10))[0][:, -1]]
        got += [model(tokens[:, [t]], cache=cache, pos=torch.tensor([t]))[0][:, -1] for t in range(10, 32)]
    torch.testing.assert_close(torch.stack(got, dim=1), expected[:, 9:], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # raised inside torch.compile
def test_compiled_decode_step_gives_the_same_tokens():
    model = tiny_model()
    prompt = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(3))
    expected = Engine(model).generate(prompt, 40, temperature=0)  # eager, across one slide
    engine = Engine(model)
    engine.compile()
    assert torch.equal(engine.generate(prompt, 40, temperature=0), expected)


def test_bfloat16_cached_decoding_follows_the_float32_model():
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = full_logits(model, tokens)
        half = tiny_model().to(torch.bfloat16)
        cache = KVCache(half.config, 2, tokens.device, torch.bfloat16)
        got = [half(tokens[:, :10], cache=cache, pos=torch.arange(10))[0][:, -1]]
        got += [half(tokens[:, [t]], cache=cache, pos=torch.tensor([t]))[0][:, -1] for t in range(10, 32)]
    got = torch.stack(got, dim=1).float()
    assert got.dtype == torch.float32 and cache.k.dtype == torch.bfloat16
    # bf16 keeps about 3 significant digits: the logits stay within a few percent of their spread
    spread = expected[:, 9:].std()
    assert (got - expected[:, 9:]).abs().max() < 0.1 * spread
    agree = (got.argmax(-1) == expected[:, 9:].argmax(-1)).float().mean()
    assert agree > 0.8


def test_stream_yields_one_token_per_row_per_step():
    model = tiny_model()
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(5))
    steps = list(Engine(model).stream(prompt, 7, temperature=0))
    assert len(steps) == 7 and all(s.shape == (2,) and s.dtype == torch.long for s in steps)
    assert torch.equal(torch.stack(steps, 1), Engine(model).generate(prompt, 7, temperature=0)[:, 5:])


# ------------------------------------------------------------------ sampling options

def test_sampling_is_reproducible_with_a_generator_and_differs_with_another_seed():
    model = tiny_model()
    prompt = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(6))
    runs = [Engine(model).generate(prompt, 40, temperature=1.0, top_k=20, top_p=0.9,
                           generator=torch.Generator().manual_seed(seed)) for seed in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_top_k_1_is_greedy():
    model = tiny_model()
    prompt = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(9))
    greedy = Engine(model).generate(prompt, 30, temperature=0)
    assert torch.equal(Engine(model).generate(prompt, 30, temperature=1.5, top_k=1), greedy)
    assert torch.equal(Engine(model).generate(prompt, 30, temperature=0.7, top_p=1e-6), greedy)


def test_temperature_sharpens_or_flattens_the_distribution():
    rows = 20000
    logits = torch.tensor([[0.6, 0.4]] * rows).log()
    seen = torch.zeros(rows, 2, dtype=torch.bool)
    no_ban = torch.tensor([], dtype=torch.long)
    share = {t: (sample_next(logits, seen, t, None, None, 1.0, no_ban, torch.Generator().manual_seed(0)) == 0)
             .float().mean().item() for t in (0.5, 1.0, 2.0)}
    # p0 = 0.6^(1/t) / (0.6^(1/t) + 0.4^(1/t)): 0.69, 0.60, 0.55
    assert share[0.5] == pytest.approx(0.692, abs=0.015)
    assert share[1.0] == pytest.approx(0.600, abs=0.015)
    assert share[2.0] == pytest.approx(0.550, abs=0.015)


def test_top_p_keeps_the_nucleus_of_what_top_k_left():
    rows = 4000
    logits = torch.tensor([[0.4, 0.35, 0.25]] * rows).log()
    seen = torch.zeros(rows, 3, dtype=torch.bool)
    no_ban = torch.tensor([], dtype=torch.long)

    def picked(top_k, top_p) -> set:
        return set(sample_next(logits, seen, 1.0, top_k, top_p, 1.0, no_ban, torch.Generator().manual_seed(0)).tolist())

    assert picked(None, None) == {0, 1, 2}
    assert picked(None, 0.5) == {0, 1}  # 0.4 alone does not reach 0.5
    assert picked(2, None) == {0, 1}
    assert picked(2, 0.5) == {0}  # after top-k the best token has 0.4 / 0.75 > 0.5


@pytest.mark.parametrize("logits", [[2.0, 1.9, 0.5], [-1.0, -1.1, -3.0]])
def test_repetition_penalty_lowers_a_seen_tokens_probability_whatever_its_sign(logits):
    rows = 20000
    logits = torch.tensor([logits] * rows)
    seen = torch.zeros(rows, 3, dtype=torch.bool)
    seen[:, 0] = True
    no_ban = torch.tensor([], dtype=torch.long)

    def share_of_token_0(penalty: float, temperature: float) -> float:
        picks = sample_next(logits, seen, temperature, None, None, penalty, no_ban, torch.Generator().manual_seed(0))
        return (picks == 0).float().mean().item()

    assert share_of_token_0(1.5, 1.0) < share_of_token_0(1.0, 1.0) - 0.05
    assert share_of_token_0(1.0, 0) == 1.0 and share_of_token_0(1.5, 0) == 0.0  # greedy switches to token 1


def test_repetition_penalty_applies_to_prompt_and_generated_tokens():
    model = tiny_model()
    prompt = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(10))
    free = Engine(model).generate(prompt, 40, temperature=0)
    # an overwhelming penalty: a token once in the context loses to any unseen token with a positive logit
    penalized = Engine(model).generate(prompt, 40, temperature=0, repetition_penalty=1e6)
    def repeats(out: torch.Tensor) -> int:
        return sum(len(row) - len(set(row)) for row in out.tolist())

    assert repeats(penalized) < repeats(free)
    assert not torch.equal(penalized, free)


def test_banned_ids_are_never_produced():
    model = tiny_model()
    prompt = torch.randint(0, 97, (4, 3), generator=torch.Generator().manual_seed(11))
    free = Engine(model).generate(prompt, 60, temperature=2.0, generator=torch.Generator().manual_seed(12))[:, 3:]
    banned = torch.unique(free)[:40].tolist()  # tokens the unrestricted model does produce
    out = Engine(model).generate(prompt, 60, temperature=2.0, banned_ids=banned, generator=torch.Generator().manual_seed(12))
    assert not torch.isin(out[:, 3:], torch.tensor(banned)).any()
    greedy = Engine(model).generate(prompt, 60, temperature=0, banned_ids=banned)
    assert not torch.isin(greedy[:, 3:], torch.tensor(banned)).any()


def test_stop_ids_finish_a_row_and_the_stream_ends_when_all_rows_have():
    model = tiny_model()
    prompt = torch.randint(0, 97, (3, 4), generator=torch.Generator().manual_seed(13))
    free = Engine(model).generate(prompt, 25, temperature=0)[:, 4:]
    stop = free[0, 5].item()
    out = Engine(model).generate(prompt, 25, temperature=0, stop_ids=[stop])[:, 4:]
    for row in range(3):
        hits = (free[row] == stop).nonzero().flatten().tolist()
        end = hits[0] + 1 if hits else 25
        assert torch.equal(out[row, :end], free[row, :end])  # the stop token itself is produced
        assert (out[row, end:] == -1).all()  # then -1 for a finished row
    # once every row has produced a stop id the stream ends
    stops = torch.tensor([free[row, 2].item() for row in range(3)])
    first_stop = [torch.isin(free[row], stops).nonzero()[0].item() for row in range(3)]
    steps = list(Engine(model).stream(prompt, 25, temperature=0, stop_ids=stops.tolist()))
    assert len(steps) == max(first_stop) + 1
    assert all(steps[-1][row] == -1 for row in range(3) if first_stop[row] < max(first_stop))


# ------------------------------------------------------------------ training

def test_initial_loss_is_ln_vocab_and_adamw_overfits_a_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, "n_embd": 32}))
    data = torch.randint(0, 97, (4, 33))
    x, y = data[:, :-1], data[:, 1:].clone()
    _, loss = model(x, y)
    assert abs(loss.item() - math.log(97)) < 0.1
    y[0, :5] = -1  # ignored positions must not break the loss
    settings = OptimizerSettings(optimizer="adamw", weight_decay=0.1, learning_rate=1e-2, beta1=0.9, beta2=0.95,
                                 muon_lr=0.0, muon_momentum=0.0, muon_weight_decay=0.0)
    [optimizer] = make_optimizers(model, settings, "cpu")
    decayed, plain = optimizer.param_groups
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    for _ in range(40):
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5


def test_num_params_mfu_and_peak_table():
    model = GPT(GPTConfig(**TINY))
    total = sum(p.numel() for p in model.parameters())
    assert model.get_num_params(non_embedding=False) == total
    assert model.get_num_params() == total - 32 * 16
    assert peak_flops_for("NVIDIA GeForce RTX 4060 Laptop GPU") == 29e12
    assert peak_flops_for("NVIDIA GeForce RTX 4060") == 30e12
    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for("NVIDIA A100-SXM4-40GB") == 312e12
    assert peak_flops_for("Some Unknown GPU") is None
    flops_per_iter = (6 * model.get_num_params() + 12 * 2 * 2 * 8 * 32) * 32 * 4
    assert model.estimate_mfu(4, 0.5, peak_flops=1e9) == pytest.approx(flops_per_iter / 0.5 / 1e9)


def test_training_on_the_used_rows_scores_what_the_whole_head_gives_once_tied():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, "n_embd": 32, "dropout": 0.0}))
    used = torch.tensor([2, 5, 6, 11, 40, 41, 90])
    model.train_head_on(used)
    x, y = used[torch.randint(0, 7, (3, 32))], used[torch.randint(0, 7, (3, 32))]
    y[0, :4] = -1
    logits, loss = model.train()(x, y)
    assert logits.shape == (3, 32, 8)  # the used rows and the shared one
    loss.backward()
    touched = model.lm_head.weight.grad.abs().sum(1).nonzero().flatten().tolist()
    assert set(touched) <= set(used.tolist()) | {0}  # 0: the first unused token, whose row the rest share
    model.tie_unused_rows()
    unused = [t for t in range(97) if t not in used.tolist()]
    assert torch.equal(model.lm_head.weight[unused], model.lm_head.weight[0].expand(len(unused), -1))
    whole_logits, whole = model.eval()(x, y)
    assert abs(whole.item() - loss.item()) < 1e-5
    # the shared column carries the probability of all 90 unused tokens together
    shared = logits.detach().softmax(-1)[..., -1]
    assert torch.allclose(shared, whole_logits.softmax(-1)[..., unused].sum(-1), atol=1e-6)
    assert torch.allclose(whole_logits.softmax(-1)[..., used], logits.detach().softmax(-1)[..., :-1], atol=1e-6)
    model.train_head_on(None)
    assert model.train()(x, y)[0].shape == (3, 32, 97)


def test_model_imports_only_torch_and_its_default_vocabulary_is_the_tokenizers():
    """model.py stands alone (as nanoGPT's does), so its literal default must follow the tokenizer's."""
    import ast
    from pathlib import Path
    tree = ast.parse((Path(__file__).resolve().parents[1] / "model.py").read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"torch", "math", "dataclasses", "inspect", "typing", "__future__"}, imported
    assert GPTConfig().vocab_size == DEFAULT_VOCAB_SIZE
