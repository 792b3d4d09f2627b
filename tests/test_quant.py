"""int8 decoding (quant.py): on a small GPT trained here on a prepared novel, the int8 model's whole-split val
loss stays within 0.01 nats of the float one with either kernel, its layers run the kernel chosen (the faster
of the two as timed), and sample.py --quantize=int8 writes text; bad settings are one-line errors."""

import io
import math
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate as evaluate_py
import sample as sample_py
import serve as serve_py
from novelgpt.checkpoint import load_model
from configurator import UserError
from novelgpt.dataset import open_dataset
from novelgpt.preparing import prepare
from novelgpt.engine import Engine
from novelgpt.scoring import whole_split_loss
from model import GPT, GPTConfig
from novelgpt import quant
from novelgpt.quant import GEMM_ROWS, KERNELS, Int8Linear, apply_quantization, check_quantize_mode, quantize_int8

PHRASES = ["宝玉笑道：", "黛玉听了，", "“你这会子又来了。”", "袭人忙说道：", "凤姐儿", "老太太", "。\n", "湘云"]


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread_per_module) -> tuple[Path, np.ndarray]:
    """A run folder (ckpt.pt) of a small GPT trained for a few seconds on a prepared novel, and its val ids."""
    root = tmp_path_factory.mktemp("quant")
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(PHRASES, size=6000))
    (root / "novel.txt").write_text(text, encoding="utf-8")
    prepare(str(root / "novel.txt"), "novel", data_dir=str(root), block_size=64, vocab_size=64)
    data = open_dataset(str(root), "novel")
    tok = data.tokenizer
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=64)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(120):
        x, y = data.get_batch("train", 16, config.block_size, generator, "cpu")
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    out = root / "out"
    out.mkdir()
    model_args = {k: getattr(config, k) for k in GPTConfig.__dataclass_fields__}
    torch.save({"model": model.state_dict(), "model_args": model_args, "vocab": tok.to_meta(),
                "config": {"dataset": "novel", "data_dir": str(root)}, "iter_num": 120, "best_val_loss": 1.0},
               out / "ckpt.pt")
    return out, np.asarray(data.tokens("val"))


KERNEL_OPS = {"dynamic": "quantized::linear_dynamic", "weight": "aten::_weight_int8pack_mm"}


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_val_loss_stays_within_a_hundredth_of_a_nat(trained, kernel):
    out, val_ids = trained
    model, tok, _ = load_model(str(out))
    int8_model = quantize_int8(load_model(str(out)).model, kernel)
    float_loss = whole_split_loss(model, val_ids, context=16)
    int8_loss = whole_split_loss(int8_model, val_ids, context=16)
    assert float_loss < 0.5 * math.log(tok.vocab_size)  # it did learn the phrases
    assert abs(int8_loss - float_loss) < 0.01, (float_loss, int8_loss)
    # the decode path (a few rows at a time) scores alike: one window, 8 positions at a time
    x = torch.as_tensor(val_ids[:65].astype(np.int64))[None]
    step_losses = []
    for start in range(0, 64, 8):
        logits, _ = int8_model(x[:, :start + 8])
        step_losses.append(torch.nn.functional.cross_entropy(logits[0, -1:], x[0, start + 8:start + 9]))
    float_logits = model(x[:, :64], x[:, 1:65])[0][0, 7::8]  # (8, V) at the same positions
    reference = torch.nn.functional.cross_entropy(float_logits, x[0, 8:65:8])
    assert abs(torch.stack(step_losses).mean().item() - reference.item()) < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
def test_layers_are_int8_and_run_the_kernel_asked_for(trained, kernel):
    out, _ = trained
    model = quantize_int8(load_model(str(out)).model, kernel)
    int8_layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(int8_layers) == 4 * model.config.n_layer + 1  # c_attn, c_proj, c_fc, c_proj per block, the head
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert all(layer.kernel == kernel for layer in int8_layers)
    assert model.lm_head.weight.dtype == torch.int8 and model.transformer.wte.weight.dtype == torch.float32
    engine = Engine(model)
    prompt = torch.tensor([[1, 2, 3]])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        tokens = engine.generate(prompt, 4, temperature=0)
    names = {e.key for e in prof.key_averages()}
    assert KERNEL_OPS[kernel] in names and not set(KERNEL_OPS.values()) - {KERNEL_OPS[kernel]} & names
    assert tokens.shape == (1, 7)
    # each layer's output is the dequantised product: activations rounded to bf16 (weight kernel) or
    # quantised to 8 bits per product (dynamic kernel: about 1% of the output's size)
    layer = model.transformer.h[0].mlp.c_fc
    for rows in (1, 8, GEMM_ROWS + 1):
        x = torch.randn(rows, layer.in_features)
        if kernel == "weight":
            expected = x.bfloat16().float() @ layer.dequantized(torch.float32).T + layer.bias
            torch.testing.assert_close(layer(x), expected, rtol=2e-2, atol=2e-2)
        else:
            expected = x @ layer.dequantized(torch.float32).T + layer.bias
            assert ((layer(x) - expected).norm() / expected.norm()).item() < 0.03


def test_auto_keeps_the_kernel_that_timed_faster(monkeypatch, capsys):
    torch.manual_seed(0)
    x = torch.tensor([[1, 2, 3]])
    for timings in ({"dynamic": 2.0, "weight": 1.0}, {"dynamic": 1.0, "weight": 3.0}):
        model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=32)).eval()
        expected = model(x)[0]
        timed = []
        monkeypatch.setattr(quant, "products_ms", lambda layers, kernel: timed.append(kernel) or timings[kernel])
        quantize_int8(model)
        faster = min(timings, key=timings.get)
        assert sorted(timed) == sorted(KERNELS)
        assert {layer.kernel for layer in quant.int8_layers(model)} == {faster}
        assert all((layer.packed is None) == (faster == "weight") for layer in quant.int8_layers(model))
        note = capsys.readouterr().err
        assert f"int8 products with the {faster} kernel" in note and f"dynamic {timings['dynamic']:.1f} ms" in note
        torch.testing.assert_close(model(x)[0], expected, rtol=0.05, atol=0.05)


def test_products_ms_times_every_layer_with_the_kernel():
    torch.manual_seed(0)
    model = quantize_int8(GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)), "weight")
    layers = quant.int8_layers(model)
    for kernel in KERNELS:
        assert quant.products_ms(layers, kernel) > 0
        assert {layer.kernel for layer in layers} == {kernel}


def test_int8_weights_round_to_their_scales():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    layer = Int8Linear(linear.weight, linear.bias)
    assert layer.weight.abs().amax(dim=1).eq(127).all()  # each row's largest weight uses the whole range
    error = (layer.dequantized(torch.float32) - linear.weight).abs()
    assert (error <= layer.scale.float()[:, None] * 0.51 + 1e-3 * linear.weight.abs()).all()


def test_tied_embedding_keeps_its_float_weight():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=32))
    embedding = model.transformer.wte.weight.detach().clone()
    quantize_int8(model)
    assert torch.equal(model.transformer.wte.weight, embedding)
    assert apply_quantization(model, "none") is model


@pytest.mark.slow
def test_sample_py_quantize_int8_writes_text(trained, capsys):
    out, _ = trained
    args = [f"--init_from={out}", "--start=宝玉", "--max_new_tokens=40", "--seed=7", "--top_k=1", "--device=cpu"]
    texts = {}
    for mode in ("none", "int8"):
        sample_py.main(args + [f"--quantize={mode}"])
        texts[mode] = capsys.readouterr().out
    corpus = "".join(PHRASES * 2) + "".join(a + b for a in PHRASES for b in PHRASES)
    pairs = {corpus[i:i + 2] for i in range(len(corpus) - 1)}
    for text in texts.values():  # the trained model's phrases, whichever weights pick them
        body = text.rstrip("\n")
        assert body.startswith("宝玉") and len(body) >= 40
        known = sum(body[i:i + 2] in pairs for i in range(len(body) - 1))
        assert known >= 0.9 * (len(body) - 1), body


@pytest.mark.slow
@pytest.mark.parametrize("script", [sample_py, serve_py])
def test_a_bad_quantize_value_is_a_one_line_error(trained, script):
    out, _ = trained
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exit_info:
        script.main([f"--init_from={out}", "--quantize=int4"])
    assert exit_info.value.code == 2
    assert err.getvalue() == "error: --quantize must be one of none, int8; got 'int4'\n"


def test_quantize_checks_the_mode_and_the_device():
    check_quantize_mode("none", "cuda:0")
    check_quantize_mode("int8", "cpu")
    with pytest.raises(UserError, match="--device=cpu"):
        check_quantize_mode("int8", "cuda:0")
    with pytest.raises(UserError, match="got 'fp8'"):
        check_quantize_mode("fp8", "cpu")
    with pytest.raises(UserError, match="for decoding on a CPU"):
        check_quantize_mode("int8", "mps")


@pytest.mark.slow
def test_evaluate_py_scores_the_int8_model(trained, capsys):
    out, val_ids = trained
    config = dict(evaluate_py.DEFAULTS, out_dir=str(out), device="cpu", context=16)
    losses = {mode: evaluate_py.evaluate(dict(config, quantize=mode))["model"] for mode in ("none", "int8")}
    assert losses["none"] == pytest.approx(whole_split_loss(load_model(str(out))[0], val_ids, context=16))
    assert losses["none"] != losses["int8"] and abs(losses["int8"] - losses["none"]) < 0.01
    assert "val split" in capsys.readouterr().out
