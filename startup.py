"""The start-up sample.py and serve.py share: a model loaded to generate with, on the runtime asked for.

    gen = load_generator("out", device="auto", compile_note="the first tokens wait for it")
    index = gen.copy_index()              # the copy check's index of its training text, said on stderr
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from checkpoint import load_memory, load_model, resolve_source
from copycheck import CopyIndex, copy_index_for
from configurator import UserError
from engine import Engine
from quant import apply_quantization, check_quantize_mode
from runtime import Runtime, auto_dtype_note, init_runtime, use_decode_threads
from tokenizer import Tokenizer

# the memory's start-up options, the same in sample.py and serve.py
MEMORY_OPTIONS = dict(
    ngram=("on", "on: mix the novel's memory (its n-gram and the recent text) into every step; off: the GPT alone"),
    dataset=("", "the dataset whose memory a model folder mixes in (a run's checkpoint names its own)"),
    data_dir=("", "where --dataset lies; default: the checkpoint's own data_dir, else data"),
)


@dataclass
class Generator:
    """A loaded model ready to generate: its Engine and tokenizer, where it came from, and its runtime."""
    engine: Engine
    tok: Tokenizer
    path: str  # the checkpoint file or model folder
    metadata: dict  # checkpoint.load_model's: what the checkpoint says beside the weights
    runtime: Runtime
    dtype_note: str | None = None  # what dtype="auto" chose and why, said with the memory's note

    def mix_memory(self, ngram: str = "on", dataset: str = "", data_dir: str = "") -> None:
        """Mix the novel's memory into the engine's every step unless ngram is "off"; one line on stderr says
        which (after the dtype note). Called after the scripts' own checks: fitting a model folder's weights takes seconds."""
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


def load_generator(source: str, *, vocab: str = "", device: str = "auto", dtype: str = "auto",
                   compile: bool | None = None, quantize: str = "none", newest_fallback: bool = False,
                   compile_note: str = "the first tokens wait for it") -> Generator:
    """The model of source (a run folder, a .pt file or a model folder; vocab for a folder without one) on
    device, quantised as asked, and its Engine, compiled when compile says so (compile_note tells for what);
    Generator.mix_memory adds the memory."""
    rt = init_runtime(device, dtype, compile, job="decode")
    use_decode_threads(rt.device_type)  # fewer threads beside busy processes
    check_quantize_mode(quantize, str(rt.device))  # before the slow part
    path = resolve_source(source, newest_fallback=newest_fallback)
    model, tok, metadata = load_model(path, vocab, rt.device, rt.dtype)
    engine = Engine(apply_quantization(model, quantize))
    if rt.compile:
        print(f"note: compiling the decode step; {compile_note}", file=sys.stderr)
        engine.compile()
    dtype_note = auto_dtype_note(rt.device_type, "decode") if dtype == "auto" else None
    return Generator(engine, tok, path, metadata, rt, dtype_note)
