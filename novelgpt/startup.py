"""The start-up sample.py and serve.py share: a model loaded to generate with, on the runtime asked for.

    writer = load_writer(config, newest_fallback=True, compile_note="the first tokens wait for it")
    writer.mix_memory(config)             # the novel's memory, as --ngram, --dataset and --data_dir say
    index = writer.copy_index()           # the copy check's index of its training text, said on stderr
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from novelgpt.checkpoint import load_model, resolve_source
from novelgpt.memory import load_memory
from novelgpt.copycheck import CopyIndex, copy_index_for
from configurator import UserError
from novelgpt.engine import Engine
from novelgpt.quant import apply_quantization, check_quantize_mode
from novelgpt.runtime import Runtime, auto_dtype_note, init_runtime, use_decode_threads
from novelgpt.tokenizer import Tokenizer


def start_options(use: str) -> dict:
    """The start-up options sample.py and serve.py share: which model, where it runs, and the memory it mixes in.
    use: what happens to the best checkpoint ("used", "served")."""
    return dict(
        out_dir=("out", f"the best checkpoint, out_dir/ckpt.pt, is {use}"),
        init_from=("", "or a GPT2-Chinese / Hugging Face GPT-2 folder, or a .pt checkpoint file"),
        vocab=("", "vocab.txt for an --init_from folder (defaults to the folder's vocab.txt)"),
        device=("auto", "auto, cpu, cuda, cuda:1, mps, or a GPU index such as 0 or 1"),
        dtype=("auto", "auto, float32, bfloat16, float16"),
        quantize=("none", "int8: int8 weights with per-channel scales, for faster decoding on a CPU"),
        compile=(None, "torch.compile the one-token decode step; None: auto (on for CUDA on Linux), or True/False"),
        ngram=("on", "on: mix the novel's memory (its n-gram and the recent text) into every step; off: the GPT alone"),
        dataset=("", "the dataset whose memory a model folder mixes in (a run's checkpoint names its own)"),
        data_dir=("", "where --dataset lies; default: the checkpoint's own data_dir, else data"),
    )


@dataclass
class Writer:
    """A loaded model ready to generate: its Engine and tokenizer, where it came from, and its runtime."""
    engine: Engine
    tok: Tokenizer
    path: str  # the checkpoint file or model folder
    metadata: dict  # checkpoint.load_model's: what the checkpoint says beside the weights
    runtime: Runtime
    dtype_note: str | None = None  # what dtype="auto" chose and why, said with the memory's note

    def mix_memory(self, config: dict) -> None:
        """Mix the novel's memory into the engine's every step unless config's ngram is "off" (its dataset and
        data_dir name the memory); one line on stderr says which (after the dtype note). Called after the scripts'
        own checks: fitting a model folder's weights takes seconds."""
        ngram, dataset, data_dir = config["ngram"], config["dataset"], config["data_dir"]
        if ngram not in ("on", "off"):
            raise UserError(f"--ngram must be on or off, got {ngram!r}")
        memory, note = load_memory(self.path, self.metadata, self.tok, self.engine.model, ngram, dataset, data_dir)
        if self.dtype_note:
            print(f"note: {self.dtype_note}", file=sys.stderr)
        print(f"note: {note}", file=sys.stderr)
        self.engine.memory = memory

    def copy_index(self) -> CopyIndex | None:
        """The copy index of the model's training text, built and cached on first use; one line on stderr says
        what is checked, or why nothing is."""
        index, note = copy_index_for(self.metadata, self.path, self.tok)
        print(note, file=sys.stderr)
        return index


def load_writer(config: dict, *, newest_fallback: bool = False,
                compile_note: str = "the first tokens wait for it") -> Writer:
    """The model that config's start_options name (init_from, else out_dir) on its device, quantised as asked,
    and its Engine, compiled when config's compile says so (compile_note tells for what); Writer.mix_memory adds
    the memory. newest_fallback: without a checkpoint in out_dir, take the newest out*/ckpt.pt here."""
    rt = init_runtime(config["device"], config["dtype"], config["compile"], job="decode")
    use_decode_threads(rt.device_type)  # fewer threads beside busy processes
    check_quantize_mode(config["quantize"], str(rt.device))  # before the slow part
    path = resolve_source(config["init_from"] or config["out_dir"], newest_fallback=newest_fallback)
    model, tok, metadata = load_model(path, config["vocab"], rt.device, rt.dtype)
    engine = Engine(apply_quantization(model, config["quantize"]))
    if rt.compile:
        print(f"note: compiling the decode step; {compile_note}", file=sys.stderr)
        engine.compile()
    dtype_note = auto_dtype_note(rt.device_type, "decode") if config["dtype"] == "auto" else None
    return Writer(engine=engine, tok=tok, path=path, metadata=metadata, runtime=rt, dtype_note=dtype_note)
