"""Train a GPT-2 on a prepared novel: one GPU, a CPU, or many GPUs with torchrun.

    python train.py config/novel_small.py                       # one GPU
    python train.py config/novel_cpu.py                         # a CPU, about 10 minutes
    python train.py config/novel_small.py --init_from=resume    # go on from out_dir/last.pt
    torchrun --standalone --nproc_per_node=4 train.py config/novel_small.py

Settings are the keys of DEFAULTS in trainsettings.py; a config file or --key=value overrides them.
Writes out_dir/ckpt.pt (best validation loss, for sample.py), out_dir/last.pt (latest, for
resume), out_dir/metrics.jsonl and out_dir/loss.png.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import shlex
import signal
import socket
import sys
import time
import urllib.parse
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from novelgpt.checkpoint import (check_vocab, checkpoint_state, fine_tune_vocab, model_from_checkpoint, read_checkpoint,
                        resolve_source)
from configurator import UserError, exit_with_error, get_config
from novelgpt.dataset import Dataset, open_dataset, vocab_size_of
from novelgpt.files import FolderLock, atomic_torch_save, remove_stale_temps, temp_path
from novelgpt.gpt2chinese_train import train_command
from novelgpt.hf import load_hf_gpt2
from novelgpt.footprint import estimate_report, plan_footprint
from novelgpt.mixture import aligned_parts, fit_mixture, fit_weights, mixture_loss
from novelgpt.ngram import InterpolatedKneserNey, load_ngram
from model import GPT
from novelgpt.optim import decay_start, lr_factor, make_optimizers, set_lr, train_step
from novelgpt.preparing import prepare_default_corpus
from novelgpt.runtime import Runtime, init_runtime, out_of_memory, peak_flops_for
from novelgpt.trainsettings import (DEFAULTS, SHAPE_KEYS, TYPES, check_config, gpt_config, optimizer_settings, schedule,
                           training_shape)

WANDB_TIMEOUT = 20  # seconds a reachable wandb server gets to start the run before it is logged offline


# ------------------------------------------------------------------ the model and its optimizer

def new_model(config: dict, dataset: Dataset) -> GPT:
    """A model to train from scratch, or the GPT2-Chinese / Hugging Face folder config['init_from']."""
    if config["init_from"] == "scratch":
        return GPT(gpt_config(config, dataset.tokenizer.vocab_size))
    source = config["init_from"]
    if not os.path.exists(source):
        close = difflib.get_close_matches(source, ["scratch", "resume"], n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else " (give scratch, resume, a model folder or a .pt file)"
        raise UserError(f"--init_from {source} does not exist{hint}")
    if not os.path.isfile(os.path.join(source, "config.json")):
        return checkpoint_model(config, dataset, resolve_source(source))
    try:
        model = load_hf_gpt2(source, dropout=config["dropout"])
    except (OSError, ValueError) as e:
        raise UserError(f"cannot fine-tune from {source}: {e}") from None
    # the checkpoints carry the folder's tokenizer metadata on; a vocabulary that is not the model's is refused
    dataset.tokenizer = fine_tune_vocab(config["init_from"], dataset)
    if model.config.vocab_size != dataset.tokenizer.vocab_size:
        raise UserError(f"{config['init_from']} has {model.config.vocab_size} tokens but dataset {dataset.folder} "
                        f"has {dataset.tokenizer.vocab_size}; prepare it with --vocab <the model's vocab.txt>")
    if config["block_size"] > model.config.block_size:
        raise UserError(f"block_size {config['block_size']} is longer than the model's "
                        f"{model.config.block_size} positions; use --block_size={model.config.block_size}")
    return model


def checkpoint_model(config: dict, dataset: Dataset, path: str) -> GPT:
    """The weights of a .pt checkpoint (or a run folder's ckpt.pt) to fine-tune: a new run, its own optimizer."""
    checkpoint = read_checkpoint(path)
    checkpoint["model_args"] = dict(checkpoint["model_args"], dropout=config["dropout"])  # the run's setting
    model, tok = model_from_checkpoint(checkpoint, path)
    check_vocab(tok, path, dataset.tokenizer, str(dataset.folder), "train it on its own dataset "
                f"(--dataset={checkpoint.get('config', {}).get('dataset')}), or export it with export.py and prepare "
                "the text with --vocab <the export's vocab.txt>")
    dataset.tokenizer = tok  # the same tokens; the checkpoint's own metadata goes on
    if config["block_size"] > model.config.block_size:
        raise UserError(f"block_size {config['block_size']} is longer than the model's "
                        f"{model.config.block_size} positions; use --block_size={model.config.block_size}")
    return model


def check_model_fits(config: dict, vocab_size: int, rt: Runtime) -> None:
    """Refuse, before building it, a model whose weights, gradients and AdamW moments alone exceed the device's
    memory (a mistyped --n_layer or --n_embd would otherwise allocate until the machine runs out)."""
    n_embd = config["n_embd"]
    parameters = config["n_layer"] * 12 * n_embd * n_embd + (vocab_size + config["block_size"]) * n_embd
    needed = 16 * parameters  # float32 weights, gradients and two optimizer moments
    if rt.device_type == "cuda":
        available = torch.cuda.get_device_properties(rt.device).total_memory
    else:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        raise UserError(f"a model of {parameters:.3g} parameters (--n_layer {config['n_layer']}, --n_embd {n_embd}) "
                        f"needs {needed / 2**30:,.1f} GB for its weights, gradients and optimizer state alone, and "
                        f"{rt.device} has {available / 2**30:,.1f} GB: lower --n_layer or --n_embd")


def resumed_model(config: dict, dataset: Dataset) -> tuple[GPT, dict]:
    """The model of out_dir/last.pt and the checkpoint itself, checked against the settings and the data."""
    path = Path(config["out_dir"]) / "last.pt"
    if not path.exists():
        raise UserError(f"nothing to resume: {path} does not exist; train with --init_from=scratch first")
    checkpoint = read_checkpoint(path)
    if "optimizers" not in checkpoint:
        raise UserError(f"{path} holds no training state of this version (weights only, or written before Muon); "
                        "sample.py and --init_from can use its weights, but it cannot be resumed")
    if checkpoint["config"].get("optimizer") != config["optimizer"]:
        raise UserError(f"{path} was trained with --optimizer={checkpoint['config'].get('optimizer')}; "
                        "resume with the same optimizer")
    model, tok = model_from_checkpoint(checkpoint, path)
    check_vocab(tok, str(path), dataset.tokenizer, str(dataset.folder),
                f"resume on the dataset it was trained on (--dataset={checkpoint['config'].get('dataset')})")
    dataset.tokenizer = tok  # the same tokens; the checkpoint's own metadata (tokenizer_class) goes on
    if checkpoint.get("dataset_fingerprint", dataset.fingerprint()) != dataset.fingerprint():
        raise UserError(f"{dataset.folder} was prepared again since {path} was written; resume needs the same "
                        "data (prepare it as before, or start a new run with --overwrite=True)")
    changed = [f"--{k}={config[k]} (the model has {checkpoint['model_args'][k]})" for k in SHAPE_KEYS
               if config[k] != checkpoint["model_args"][k]]
    if changed:
        raise UserError(f"resume keeps the model's shape, but {', '.join(changed)}; use the settings it was "
                        "trained with (the same config file), or a new --out_dir")
    return model, checkpoint


# ------------------------------------------------------------------ one step, one evaluation

@torch.no_grad()
def estimate_loss(model: GPT, dataset: Dataset, config: dict, rt: Runtime,
                  val_memory: np.ndarray | None = None, stopping: Callable[[], bool] = lambda: False
                  ) -> dict[str, float] | None:
    """Mean loss over eval_iters batches per split; the same batches every time, so evals compare.
    val_memory (3, N_val): the memory's parts on val; then also the mixture's val loss on the same batches.
    None when `stopping` says so before a batch (Ctrl-C or SIGTERM): a long evaluation stops within one batch."""
    model.tie_unused_rows()  # evaluation runs the whole head
    model.eval()
    losses, parts = {}, []
    for split in ("train", "val"):
        generator = torch.Generator().manual_seed(config["seed"])
        total = 0.0
        for _ in range(config["eval_iters"]):
            if stopping():
                model.train()
                return None
            if split == "val" and val_memory is not None:
                x, y, memory = dataset.get_batch(split, config["batch_size"], config["block_size"], generator,
                                                 rt.device, aligned=val_memory)  # memory (B, 3, T)
                with rt.autocast():
                    logits, loss = model(x, y)
                p_gpt = torch.softmax(logits.float(), dim=-1).gather(-1, y[..., None])[..., 0]  # (B, T)
                parts.append(torch.cat([p_gpt[:, None], memory], dim=1).transpose(0, 1).reshape(memory.size(1) + 1, -1).cpu())
            else:
                x, y = dataset.get_batch(split, config["batch_size"], config["block_size"], generator, rt.device)
                with rt.autocast():
                    _, loss = model(x, y)
            total += loss.item()
        losses[split] = total / config["eval_iters"]
    if parts:
        parts = torch.cat(parts, dim=1).double().numpy()
        losses["val_mixture"] = mixture_loss(parts, fit_weights(parts))
    model.train()
    return losses


# ------------------------------------------------------------------ logging and stopping

class MetricsLog:
    """metrics.jsonl (and wandb when asked); on ranks other than 0 every call does nothing."""

    def __init__(self, out_dir: Path, config: dict, rt: Runtime, fresh: bool):
        self.path = out_dir / "metrics.jsonl" if rt.master else None
        self.run = None
        self.start = time.monotonic()  # each record's "seconds": wall time of this process, compiling included
        # A new run's curves must not mix with an old one's, but the old ones stay until this run has saved a
        # checkpoint to replace that run's model with: until then the records go to a temporary file.
        self.pending = temp_path(self.path) if self.path and fresh else None
        if self.pending:
            self.pending.unlink(missing_ok=True)
        if self.path and config["wandb_log"]:
            import wandb
            mode, why = wandb_mode(), "no login found"
            if mode == "online":
                unreachable = wandb_unreachable()
                if unreachable:
                    mode, why = "offline", f"cannot reach {unreachable}"
            arguments = dict(project=config["wandb_project"], name=config["wandb_run_name"] or
                             f"{config['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}", config=config, dir=str(out_dir))
            try:
                online = dict(settings=wandb.Settings(init_timeout=WANDB_TIMEOUT)) if mode == "online" else {}
                self.run = wandb.init(**arguments, mode=mode, **online)
            except Exception as e:  # the server answered but would not start the run (a bad key, a timeout, ...)
                if mode != "online":
                    raise
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
                mode, why = "offline", f"the server refused the run ({first})"
                self.run = wandb.init(**arguments, mode=mode)
            if mode == "offline":
                print(f"wandb: {why}, logging offline; upload later with: "
                      f"wandb sync {self.run.dir.rsplit('/files', 1)[0]}")

    def log(self, record: dict) -> None:
        record = dict(record, seconds=round(time.monotonic() - self.start, 1))
        if self.path:
            with open(self.pending or self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log(record, step=record["iter"])

    def saved(self) -> None:
        """A checkpoint of this run is on disk: its records replace the previous run's metrics.jsonl now."""
        if self.pending:
            if self.pending.exists():
                os.replace(self.pending, self.path)
            else:
                self.path.unlink(missing_ok=True)
            self.pending = None

    def close(self) -> None:
        if self.pending:  # nothing was saved: the previous run's metrics.jsonl and loss.png stay as they were
            self.pending.unlink(missing_ok=True)
        elif self.path and self.path.exists():
            plot_losses(self.path)
        if self.run is not None:
            self.run.finish()
            import wandb
            wandb.teardown()  # waits for wandb's service to write the run out (an offline run once lost its metrics)


def wandb_mode() -> str:
    """'online' when a wandb login exists, else 'offline' (WANDB_MODE, if set, wins)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        import netrc
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


def wandb_unreachable(timeout: float = 3.0) -> str | None:
    """None when wandb's server (WANDB_BASE_URL, else api.wandb.ai) takes a connection within timeout seconds,
    else the address and the reason: a run then logs offline at once instead of waiting minutes for it."""
    url = urllib.parse.urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host, port = url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{host}:{port} ({e.strerror or e})"


def plot_losses(metrics_path: Path) -> None:
    """loss.png beside metrics.jsonl: train and val loss against tokens seen, the mixture's val loss, and the
    memory alone (the n-gram) as a line to beat; the y-axis shows the part of the run that matters, not the
    first evaluation's 9+ nats."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines()]
    fig, ax = plt.subplots(figsize=(8, 5))
    shown = []
    for key, label in (("loss", "train (batch)"), ("val_loss", "val, the GPT alone"),
                       ("val_mixture", "val, mixed with the memory")):
        points = [(r["tokens"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if key != "loss" else None)
            shown += [v for t, v in points if t > 0]
    ngram = next((r["val_ngram"] for r in records if "val_ngram" in r), None)
    if ngram is not None:
        ax.axhline(ngram, color="grey", linestyle="--", label=f"val, the n-gram alone ({ngram:.3f})")
        shown.append(ngram)
    if shown:  # from a little under the best to 1.5 nats above the n-gram (or the best): where runs differ
        low, high = min(shown), max(shown)
        ax.set_ylim(low - 0.1, min(high, (ngram if ngram is not None else low) + 1.5) + 0.1)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats per character)")
    ax.legend()
    ax.grid(alpha=0.3)
    tmp = metrics_path.with_name(f".loss.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, metrics_path.with_name("loss.png"))


class StopRequest:
    """Ctrl-C / SIGTERM: finish the step, save, exit cleanly. A second Ctrl-C stops at once."""

    def __init__(self, master: bool):
        self.requested, self.master = False, master
        self.signal = signal.SIGINT  # the first one received: the exit status says which (130 or 143)
        self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signal = True, signal.Signals(signum)
        if self.master:
            print(f"\n{signal.Signals(signum).name}: finishing this step, then saving (Ctrl-C again to quit now)")

    def agreed(self, rt: Runtime) -> bool:
        """Whether to stop now; under torchrun every rank must agree, so the flag is reduced across them."""
        if rt.ddp:
            flag = torch.tensor(float(self.requested), device=rt.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.requested = bool(flag.item())
        return self.requested

    def restore(self) -> None:
        for s, handler in self.old.items():
            signal.signal(s, handler)


def format_duration(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ------------------------------------------------------------------ a run: setup, checkpoints, progress

@dataclass
class Run:
    """Everything one training run holds; the loop in train() reads and advances it."""
    config: dict
    rt: Runtime
    dataset: Dataset
    out_dir: Path
    raw_model: GPT  # the plain module: what checkpoints save and evaluation runs
    model: torch.nn.Module  # what the step runs: compiled and/or wrapped by DDP
    optimizers: list[torch.optim.Optimizer]
    scaler: torch.amp.GradScaler
    batch_generator: torch.Generator  # the data order; the same on every rank, each takes its own rows
    log: MetricsLog
    max_iters: int
    tokens_per_iter: int
    fingerprint: str  # the dataset as it was when the run began
    counts: InterpolatedKneserNey | None = None  # the memory (ngram_order > 0)
    train_memory: np.ndarray | None = None  # (N_train,) leave-one-out p_ngram of each training token (ngram_train)
    val_memory: np.ndarray | None = None  # (3, N_val) the memory's parts (mixture.aligned_parts) on each val token
    iter_num: int = 0
    best_val_loss: float = math.inf
    best_iter: int = 0
    stale_evals: int = 0  # evaluations since the val loss last improved

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """This rank's rows of the next optimizer step: (batch_size * accumulation, block_size) each, and the
        memory's probabilities of the targets when training through the mixture (else None)."""
        rows = self.config["batch_size"] * self.config["gradient_accumulation_steps"] // self.rt.world_size
        batch = self.dataset.get_batch("train", rows * self.rt.world_size, self.config["block_size"],
                                       self.batch_generator, self.rt.device, aligned=self.train_memory)
        mine = slice(self.rt.rank * rows, (self.rt.rank + 1) * rows)
        x, y = batch[0][mine], batch[1][mine]
        return x, y, batch[2][mine] if self.train_memory is not None else None

    def state(self, full: bool) -> dict:
        """ckpt.pt's contents; with full, what resume needs on top: optimizer, scaler and RNG states."""
        self.raw_model.tie_unused_rows()
        state = checkpoint_state(self.raw_model, self.dataset.tokenizer, self.config, self.iter_num,
                                 self.best_val_loss)
        state["dataset_fingerprint"] = self.fingerprint
        state["used_vocab_head"] = self.raw_model.head_rows is not None
        if full:
            rng = {"torch": torch.get_rng_state(), "batch": self.batch_generator.get_state()}
            if self.rt.device_type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.rt.device)
            state.update(optimizers=[o.state_dict() for o in self.optimizers], scaler=self.scaler.state_dict(),
                         rng=rng, best_iter=self.best_iter, stale_evals=self.stale_evals, max_iters=self.max_iters)
        return state

    def restore(self, checkpoint: dict) -> None:
        """Go on exactly where last.pt stopped."""
        self.iter_num, self.best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        self.best_iter, self.stale_evals = checkpoint["best_iter"], checkpoint["stale_evals"]
        if self.config["time_budget"] and "max_iters" in checkpoint:
            self.max_iters = checkpoint["max_iters"]  # the length planned when the run began: resume ends the same
        for optimizer, state in zip(self.optimizers, checkpoint["optimizers"]):
            optimizer.load_state_dict(state)
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.batch_generator.set_state(checkpoint["rng"]["batch"])
        if self.rt.master:  # the other ranks' dropout streams are not saved; only rank 0's is restored
            torch.set_rng_state(checkpoint["rng"]["torch"])
            if self.rt.device_type == "cuda" and "cuda" in checkpoint["rng"]:
                torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])


def claim_out_dir(config: dict, rt: Runtime, stack: ExitStack) -> Path:
    """Create and lock out_dir; refuse to start over a trained model unless asked to."""
    out_dir = Path(config["out_dir"])
    if not rt.master:
        return out_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out_dir {out_dir}: {e.strerror or e}") from None
    if not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir} is not a folder")
    stack.enter_context(FolderLock(out_dir, "training"))
    remove_stale_temps(out_dir)  # temporary files of runs that were killed mid-save
    trained = [name for name in ("ckpt.pt", "last.pt") if (out_dir / name).exists()]
    if trained and config["init_from"] != "resume" and not config["overwrite"]:
        raise UserError(f"{out_dir} already holds a trained model ({', '.join(trained)}); continue it with "
                        f"--init_from=resume, or start again with --overwrite=True (replaces it) or a new --out_dir")
    return out_dir


def setup_run(config: dict, rt: Runtime, stack: ExitStack) -> Run:
    """Data, model, optimizer, logging: everything before the first step."""
    out_dir = claim_out_dir(config, rt, stack)
    if rt.ddp and not rt.master:
        torch.distributed.barrier()  # rank 0 prepares the default corpus if it is missing
    if rt.master:
        prepare_default_corpus(config["data_dir"], config["dataset"])
    dataset = open_dataset(config["data_dir"], config["dataset"], config["block_size"])
    if rt.ddp and rt.master:
        torch.distributed.barrier()
    data, out = dataset.folder.resolve(), out_dir.resolve()
    if out == data or data in out.parents:
        raise UserError(f"--out_dir {out_dir} and the dataset folder {dataset.folder} overlap; prepare.py owns the "
                        f"dataset folder, so write the run elsewhere: --out_dir=out-{config['dataset']}")
    if rt.master:
        stack.enter_context(FolderLock(dataset.folder, "training", shared=True))
    if (config["batch_size"] * config["gradient_accumulation_steps"]) % rt.world_size:
        raise UserError(f"batch_size x gradient_accumulation_steps must be divisible by the {rt.world_size} processes")
    if config["init_from"] == "scratch":
        check_model_fits(config, dataset.tokenizer.vocab_size, rt)
    checkpoint = None
    if config["init_from"] == "resume":
        model, checkpoint = resumed_model(config, dataset)
    else:
        model = new_model(config, dataset)
    model.to(rt.device)
    new_weights = checkpoint.get("used_vocab_head", False) if checkpoint else config["init_from"] == "scratch"
    if config["used_vocab_head"] and new_weights:
        model.train_head_on(torch.from_numpy(dataset.used_tokens()))
    step_model = torch.compile(model) if rt.compile else model
    if rt.ddp:
        step_model = torch.nn.parallel.DistributedDataParallel(
            step_model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
    tokens_per_iter = config["batch_size"] * config["gradient_accumulation_steps"] * config["block_size"]
    max_iters = config["max_iters"] or math.ceil(config["epochs"] * dataset.meta["train_tokens"] / tokens_per_iter)
    optimizers = make_optimizers(model, optimizer_settings(config), rt.device_type)
    run = Run(config, rt, dataset, out_dir, model, step_model, optimizers,
              torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == torch.float16),
              torch.Generator().manual_seed(config["seed"]), MetricsLog(out_dir, config, rt, fresh=checkpoint is None),
              max_iters, tokens_per_iter, dataset.fingerprint())
    stack.callback(run.log.close)
    if config["ngram_order"]:
        run.counts = load_ngram(dataset.folder, dataset.tokens("train"), dataset.tokenizer.vocab_size,
                                run.fingerprint, config["ngram_order"])
        run.val_memory = aligned_parts(run.counts, np.asarray(dataset.tokens("val")))
        if config["ngram_train"]:
            run.train_memory = run.counts.leave_one_out
    if checkpoint is not None:
        run.restore(checkpoint)
    if rt.master:
        print(f"{model.get_num_params() / 1e6:.1f}M parameters, {rt.device} {rt.dtype_name}"
              f"{', compiled' if rt.compile else ''}, {rt.world_size} process(es); {tokens_per_iter:,} tokens per "
              f"iteration, {'at most ' if config['time_budget'] else ''}{max_iters:,} iterations = "
              f"{max_iters * tokens_per_iter / dataset.meta['train_tokens']:.2f} epochs of "
              f"{dataset.meta['train_tokens']:,} tokens" + (f", within {config['time_budget']:.0f} s of wall time"
                                                              if config["time_budget"] else ""))
    return run


def save(run: Run, name: str, full: bool) -> None:
    if run.rt.master:
        atomic_torch_save(run.state(full), run.out_dir / name)
        run.log.saved()


def evaluate_and_save(run: Run, stopping: Callable[[], bool] = lambda: False) -> dict[str, float] | None:
    """Estimate the losses, log them, keep the best checkpoint and the latest training state; None when
    stopped during the evaluation (nothing logged or saved then)."""
    if run.dataset.fingerprint() != run.fingerprint:
        raise UserError(f"{run.dataset.folder} was prepared again during training; stopped (the last good "
                        "checkpoint is kept). Prepare new data under another --dataset while a run uses it")
    losses = estimate_loss(run.raw_model, run.dataset, run.config, run.rt, run.val_memory, stopping)
    if losses is None:
        return None
    if not all(map(math.isfinite, losses.values())):
        raise FloatingPointError(f"the loss became {losses['train']} at iteration {run.iter_num}")
    val = losses["val"]
    if run.rt.master:
        mixed = f", with the memory {losses['val_mixture']:.4f}" if "val_mixture" in losses else ""
        print(f"iter {run.iter_num}: train loss {losses['train']:.4f}, val loss {val:.4f} "
              f"({val / math.log(2):.3f} bits/char, perplexity {math.exp(val):.1f}){mixed}")
        record = {"iter": run.iter_num, "tokens": run.iter_num * run.tokens_per_iter,
                  "train_loss": losses["train"], "val_loss": val, "val_bits_per_char": val / math.log(2),
                  "val_perplexity": math.exp(val)}
        if "val_mixture" in losses:
            record["val_mixture"] = losses["val_mixture"]
            record["val_ngram"] = float(-np.log(run.val_memory[0][1:]).mean())  # the memory alone, whole split
        run.log.log(record)
    if run.config["ngram_train"]:
        val = losses["val_mixture"]  # the network is trained for the mixture: keep the best mixture
    if val < run.best_val_loss:
        run.best_val_loss, run.best_iter, run.stale_evals = val, run.iter_num, 0
        save(run, "ckpt.pt", full=False)
    else:
        run.stale_evals += 1
        if run.stale_evals == run.config["patience"] and run.rt.master:
            print(f"note: the val loss has not improved for {run.stale_evals} evaluations: the model is starting to "
                  f"memorise the text. The best checkpoint is at iteration {run.best_iter} with val "
                  f"{run.best_val_loss:.4f}" + ("; stopping (--early_stop)" if run.config["early_stop"] else ""))
    save(run, "last.pt", full=True)
    return losses


def memorising(run: Run) -> bool:
    """True when early_stop is on and patience evaluations in a row brought no better val loss."""
    return run.config["early_stop"] and 0 < run.config["patience"] <= run.stale_evals


def log_progress(run: Run, loss: float, lr: float, timed_iters: int, elapsed: float) -> None:
    """One line per log_interval: loss, speed and time left (for the run and to the next evaluation)."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"the training loss became {loss} at iteration {run.iter_num}")
    config, it = run.config, run.iter_num
    seconds_per_iter = elapsed / timed_iters
    to_eval = config["eval_interval"] - it % config["eval_interval"]
    record = {"iter": it, "epoch": it * run.tokens_per_iter / run.dataset.meta["train_tokens"],
              "tokens": it * run.tokens_per_iter, "loss": loss, "lr": lr, "ms_per_iter": 1000 * seconds_per_iter,
              "tokens_per_s": run.tokens_per_iter / seconds_per_iter}
    line = (f"iter {it}/{run.max_iters} (epoch {record['epoch']:.2f}): loss {loss:.4f}, lr {lr:.2e}, "
            f"{record['ms_per_iter']:.0f} ms/iter, {record['tokens_per_s']:,.0f} tokens/s")
    if run.rt.device_type == "cuda":
        peak = config["peak_flops"] or peak_flops_for(torch.cuda.get_device_name(run.rt.device))
        if peak:
            record["mfu"] = run.raw_model.estimate_mfu(config["batch_size"] * config["gradient_accumulation_steps"]
                                                       // run.rt.world_size, seconds_per_iter, peak)
            line += f", MFU {100 * record['mfu']:.1f}%"
        record["peak_memory_gb"] = torch.cuda.max_memory_allocated(run.rt.device) / 2**30
        line += f", peak memory {record['peak_memory_gb']:.2f} GB"
    line += (f"; left {format_duration((run.max_iters - it) * seconds_per_iter)}, "
             f"next eval in {format_duration(min(to_eval, run.max_iters - it) * seconds_per_iter)}")
    print(line)
    run.log.log(record)


def step_surviving_oom(run: Run, x: torch.Tensor, y: torch.Tensor, micro_batch: int,
                       memory: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """train_step, redone with half the micro-batch (twice the accumulation, so the same rows and tokens per
    step) whenever the GPU runs out of memory; returns the loss and the micro-batch that fitted."""
    while True:
        try:
            return train_step(run.model, run.optimizers, run.scaler, x, y, micro_batch, run.rt,
                              run.config["grad_clip"], memory, run.config["ngram_train_weight"]), micro_batch
        except torch.cuda.OutOfMemoryError:
            if micro_batch == 1:
                raise UserError(f"out of GPU memory at micro-batch 1 (iteration {run.iter_num}); use a smaller "
                                "model or --block_size, or --dtype=bfloat16") from None
        for optimizer in run.optimizers:  # the partial step's gradients are thrown away: the step is redone
            optimizer.zero_grad(set_to_none=True)
        if run.rt.device_type == "cuda":
            torch.cuda.empty_cache()
        micro_batch = (micro_batch + 1) // 2
        if run.rt.master:
            print(f"note: out of GPU memory at iteration {run.iter_num}; redoing the step with micro-batch "
                  f"{micro_batch} ({math.ceil(x.size(0) / micro_batch)} accumulation steps, the same tokens per step)")


class LengthPlanner:
    """time_budget: sets run.max_iters so that the run, compiling and evaluations included, ends within the
    budget on this machine. Planned after a few timed steps, then again at each evaluation while the rate is
    still at its peak (WSD's stable phase), so a machine that slows down or speeds up is followed."""

    CALIBRATION_STEPS = 10
    clock = staticmethod(time.monotonic)  # seconds; tests put a simulated clock here

    def __init__(self, run: Run, start: float):
        # a resumed run keeps the length planned when it began, so it ends as the uninterrupted one would
        self.enabled = run.config["time_budget"] > 0 and run.config["init_from"] != "resume"
        self.budget, self.start, self.limit = run.config["time_budget"], start, run.max_iters
        self.mark_iter: int | None = None  # timing starts after the first step, which compiles
        self.mark_time = self.eval_seconds = self.eval_in_window = 0.0
        self.planned = False

    def after_step(self, run: Run) -> None:
        if not self.enabled:
            return
        if self.mark_iter is None:
            self.mark_iter, self.mark_time, self.eval_in_window = run.iter_num, self.clock(), 0.0
        elif not self.planned and run.iter_num >= self.mark_iter + self.CALIBRATION_STEPS:
            self.plan(run)
        elif (self.planned and not run.rt.ddp and run.iter_num < run.max_iters
              and self.clock() - self.start + self.eval_seconds > self.budget):
            # the machine slowed down after the last plan: end now rather than late (under torchrun the ranks'
            # clocks could disagree, so there only the plans, which are shared, decide)
            if run.rt.master:
                print(f"time budget {self.budget:.0f} s spent: stopping at iteration {run.iter_num:,} of {run.max_iters:,}")
            run.max_iters = run.iter_num

    def after_eval(self, run: Run, seconds: float) -> None:
        self.eval_seconds = seconds
        self.eval_in_window += seconds
        if (self.enabled and self.planned and run.iter_num < run.max_iters
                and run.iter_num < decay_start(schedule(run.config), run.max_iters)):
            self.plan(run)

    def plan(self, run: Run) -> None:
        now = self.clock()
        seconds_per_iter = (now - self.mark_time - self.eval_in_window) / max(1, run.iter_num - self.mark_iter)
        left = self.budget - (now - self.start) - self.eval_seconds  # the final evaluation is always made
        per_iter = seconds_per_iter + self.eval_seconds / run.config["eval_interval"]  # evaluations, spread out
        planned = min(self.limit, run.iter_num + max(0, int(left / per_iter)))
        if run.rt.ddp:  # every rank must stop at the same iteration: rank 0's plan is used
            planned_tensor = torch.tensor(planned, device=run.rt.device)
            torch.distributed.broadcast(planned_tensor, src=0)
            planned = int(planned_tensor.item())
        if run.rt.master and planned != run.max_iters:
            print(f"time budget {self.budget:.0f} s: {planned:,} iterations ({1000 * seconds_per_iter:.0f} ms per "
                  f"iteration, {self.eval_seconds:.1f} s per evaluation, {now - self.start:.0f} s used)"
                  + (" = every one allowed by max_iters/epochs" if planned == self.limit else ""))
        run.max_iters, self.planned = planned, True
        self.mark_iter, self.mark_time, self.eval_in_window = run.iter_num, now, 0.0


def dataset_vocab_size(config: dict) -> int:
    return vocab_size_of(Path(config["data_dir"]) / config["dataset"])


def fit_footprint(config: dict, rt: Runtime) -> dict:
    """config with the micro-batch and accumulation that --gpu_memory's budget chose (memory.plan_footprint)."""
    shape = plan_footprint(training_shape(config, dataset_vocab_size(config)), config["gpu_memory"], rt)
    return dict(config, batch_size=shape.batch_size, gradient_accumulation_steps=shape.gradient_accumulation_steps)


def train(config: dict) -> dict:
    """Run training as `config` says; returns the final iteration and losses."""
    check_config(config)
    start = LengthPlanner.clock()
    rt = init_runtime(config["device"], config["dtype"], config["compile"], seed=config["seed"])
    config = fit_footprint(config, rt)
    curve = schedule(config)
    losses, stopped, run = {}, None, None
    try:
        with ExitStack() as stack:
            run = setup_run(config, rt, stack)
            planner = LengthPlanner(run, start)
            stop = StopRequest(rt.master)
            stack.callback(stop.restore)
            micro_batch = config["batch_size"]
            loss_sum, t0, timed_iters = torch.zeros((), device=rt.device), time.time(), 0
            while True:
                evaluated = False
                if run.iter_num % config["eval_interval"] == 0 or run.iter_num >= run.max_iters:
                    eval_start = planner.clock()
                    losses = evaluate_and_save(run, lambda: stop.requested) or losses
                    eval_seconds = planner.clock() - eval_start
                    planner.after_eval(run, eval_seconds)
                    t0 += eval_seconds  # evaluation time is not training speed
                    evaluated = True
                # every rank evaluates at the same iteration, so they can agree on stopping right after it
                if evaluated and stop.agreed(rt):
                    stopped = stop_and_save(run, stop)
                    break
                if run.iter_num >= run.max_iters or memorising(run):
                    break
                factor = lr_factor(run.iter_num, curve, run.max_iters)
                set_lr(run.optimizers, factor)
                x, y, memory = run.next_batch()
                loss, micro_batch = step_surviving_oom(run, x, y, micro_batch, memory)
                loss_sum += loss
                run.iter_num += 1
                timed_iters += 1
                planner.after_step(run)
                at_log = run.iter_num % config["log_interval"] == 0
                if at_log:
                    if rt.master:
                        log_progress(run, loss_sum.item() / timed_iters, factor * config["learning_rate"], timed_iters,
                                     time.time() - t0)
                    loss_sum.zero_()
                    t0, timed_iters = time.time(), 0
                # under torchrun the ranks agree on stopping at log intervals only: it costs a sync
                if (at_log or not rt.ddp) and stop.agreed(rt):
                    stopped = stop_and_save(run, stop)
                    break
            if rt.master and run.counts is not None and not stopped:
                attach_mixture(run)
            if rt.ddp:
                check_ranks_in_sync(run.raw_model, rt.master)
                # every rank done before any tears gloo down: otherwise one sometimes aborted at exit
                # ("terminate called without an active exception", 2 runs in 22 of the torchrun test)
                torch.distributed.barrier()
    except FloatingPointError as e:
        raise FloatingPointError(f"{e}; training stopped, the last good checkpoint is kept. "
                                 f"{divergence_advice(config, rt)}") from None
    except (RuntimeError, MemoryError) as e:
        short = out_of_memory(e)
        if short is None:
            raise
        raise UserError(f"{short} at iteration {run.iter_num if run else 0} on {rt.device}: lower "
                        f"--batch_size (now {config['batch_size']}) or --block_size (now {config['block_size']}), or "
                        f"train a smaller model (--n_layer {config['n_layer']}, --n_embd {config['n_embd']}); "
                        "--estimate_memory says what a setting needs") from None
    finally:
        if rt.ddp:
            torch.distributed.destroy_process_group()
    return {"iter_num": run.iter_num, "max_iters": run.max_iters, "best_val_loss": run.best_val_loss,
            "best_iter": run.best_iter,
            "train_loss": losses.get("train"), "val_loss": losses.get("val"), "stopped": stopped}


def attach_mixture(run: Run) -> None:
    """Fit the mixture's weights for the best checkpoint on the whole val split and store them in ckpt.pt."""
    path = run.out_dir / "ckpt.pt"
    if not path.exists():
        return
    checkpoint = read_checkpoint(path)
    model, _ = model_from_checkpoint(checkpoint, path)
    record = fit_mixture(model.to(run.rt.device), run.counts, np.asarray(run.dataset.tokens("val")),
                         run.fingerprint, autocast=run.rt.autocast())
    checkpoint["mixture"] = record
    atomic_torch_save(checkpoint, path)
    val, w = record["val"], record["weights"]
    print(f"the memory: whole val split {val['model']:.4f} (GPT), {val['ngram']:.4f} ({record['order']}-gram), "
          f"{val['mixture']:.4f} mixed (weights GPT {w['gpt']:.2f}, n-gram {w['ngram']:.2f}, caches "
          f"{w['cache']:.2f} + {w['pair_cache']:.2f}); stored in {path}")


def stop_and_save(run: Run, stop: StopRequest) -> signal.Signals:
    """Save last.pt on a Ctrl-C or SIGTERM and print the command that resumes; returns the signal."""
    if run.iter_num == 0:  # nothing trained yet: no state worth replacing the out_dir's files with
        if run.rt.master:
            print("stopped before the first step; nothing saved")
        return stop.signal
    save(run, "last.pt", full=True)
    if run.rt.master:
        print(f"saved {run.out_dir / 'last.pt'} at iteration {run.iter_num}; resume with:\n  {resume_command(sys.argv)}")
    return stop.signal


def resume_command(argv: list[str]) -> str:
    """The command line that resumes this run: the same one, with its own --init_from (and --overwrite) left out."""
    kept, i = [], 1
    while i < len(argv):
        arg = argv[i]
        name, has_value, _ = arg.partition("=")
        i += 1
        if name in ("--init_from", "--pretrained_model", "--overwrite"):
            # the value is the next word unless given with =; a bare --overwrite takes one only if it is a bool word
            if not has_value and i < len(argv) and (name != "--overwrite" or argv[i] in ("True", "true", "False", "false")):
                i += 1
            continue
        kept.append(arg)
    return shlex.join(["python", os.path.basename(argv[0]), *kept, "--init_from=resume"])


def divergence_advice(config: dict, rt: Runtime) -> str:
    """What to change after the loss became NaN or infinite; a precision is advised only if the run is not using it."""
    rates = f"Lower --learning_rate (now {config['learning_rate']:g})"
    if config["optimizer"] == "muon":
        rates += f" or --muon_lr (now {config['muon_lr']:g})"
    if rt.dtype_name == "float16":
        return f"{rates}, or use --dtype=bfloat16 (or float32): float16 overflows easily"
    if rt.dtype_name == "bfloat16":
        return f"{rates}, or use --dtype=float32"
    return f"{rates}, or raise --warmup_iters (now {config['warmup_iters']})"


def check_ranks_in_sync(model: GPT, master: bool) -> None:
    """DDP keeps every rank's weights equal; check it once at the end (a cheap checksum)."""
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    low, high = checksum.clone(), checksum.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    if low.item() != high.item():
        raise RuntimeError(f"ranks diverged: weight checksums from {low.item()} to {high.item()}")
    if master:
        print(f"ranks in sync: weight checksum {high.item():.6f} on every rank")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        chinese = train_command(argv, DEFAULTS, TYPES)  # GPT2-Chinese's train.py flags, mapped onto ours
        config = get_config(DEFAULTS, chinese.argv if chinese else argv, types=TYPES)
        if config["estimate_memory"]:
            check_config(config)
            print(estimate_report(training_shape(config, dataset_vocab_size(config)), config["gpu_memory"],
                                  config["device"], config["dtype"], config["compile"]))
            return
        result = train(config)
        if chinese and not result["stopped"] and os.environ.get("RANK", "0") == "0":
            print(f"exported the best model to {chinese.export(config['out_dir'])} (GPT2-Chinese's final_model)")
    except (UserError, FloatingPointError) as e:
        exit_with_error(e)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130)
    if result["stopped"]:
        raise SystemExit(128 + result["stopped"])  # 130 after Ctrl-C (SIGINT), 143 after SIGTERM, as shells expect
    if result["val_loss"] is not None:
        print(f"done: {result['iter_num']} iterations, final val loss {result['val_loss']:.4f}, "
              f"best {result['best_val_loss']:.4f}")


if __name__ == "__main__":
    main()
