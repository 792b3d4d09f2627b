"""Train a GPT-2 on a prepared novel: one GPU, a CPU, or many GPUs with torchrun.

    python train.py config/novel_small.py                       # one GPU
    python train.py config/novel_cpu.py                         # a CPU, about 10 minutes
    python train.py config/novel_small.py --init_from=resume    # go on from out_dir/last.pt
    torchrun --standalone --nproc_per_node=4 train.py config/novel_small.py

Settings are the keys of DEFAULTS below; a config file or --key=value overrides them.
Writes out_dir/ckpt.pt (best validation loss, for sample.py), out_dir/last.pt (latest, for
resume), out_dir/metrics.jsonl and out_dir/loss.png.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from configurator import ConfigError, exit_with_error, get_config
from model import GPT, GPTConfig, peak_flops_for
from tokenizer import Tokenizer

TYPES = dict(compile=bool)  # keys whose default None means auto
DEFAULTS = dict(
    # data and output
    dataset="hongloumeng",  # folder under data_dir written by prepare.py
    data_dir="data",
    out_dir="out",
    init_from="scratch",  # 'scratch', 'resume' (out_dir/last.pt) or a GPT2-Chinese / HF GPT-2 model folder
    # model (vocab_size comes from the dataset)
    n_layer=10,
    n_head=12,
    n_embd=768,
    block_size=512,
    dropout=0.1,
    bias=True,
    # batch: tokens per optimizer step = batch_size * block_size * gradient_accumulation_steps
    batch_size=8,
    gradient_accumulation_steps=4,  # in total, divided among the processes under torchrun
    # length: max_iters if it is above 0, else epochs over the training tokens
    max_iters=0,
    epochs=15.0,
    # AdamW with warm-up and cosine decay to min_lr
    learning_rate=3e-4,
    min_lr=3e-5,
    warmup_iters=200,
    decay_lr=True,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,
    # evaluation, logging, checkpoints
    eval_interval=250,
    eval_iters=40,
    log_interval=10,
    wandb_log=False,
    wandb_project="novelgpt",
    wandb_run_name="",  # empty: "<dataset>-<time>"
    # system
    device="auto",  # 'auto' (CUDA, else MPS, else CPU), 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype="auto",  # 'auto', 'float32', 'bfloat16', 'float16'
    compile=None,  # None: auto (on for CUDA on Linux); True or False to force
    peak_flops=0.0,  # the GPU's dense bf16 peak FLOP/s for MFU; 0: look it up by GPU name
    seed=1337,
)


def pick_device(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_has_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX), so autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(name: str, device_type: str) -> str:
    if name != "auto":
        return name
    if device_type == "cuda":
        # bf16 from compute capability 8.0 (Ampere) on; older GPUs get fp16 with a gradient scaler.
        return "bfloat16" if torch.cuda.get_device_capability()[0] >= 8 else "float16"
    if device_type == "cpu" and cpu_has_bf16():
        return "bfloat16"
    return "float32"


def pick_compile(setting: bool | None, device_type: str) -> bool:
    if setting is False or (setting is None and not (device_type == "cuda" and sys.platform == "linux")):
        return False
    try:
        import triton  # noqa: F401  (torch.compile's GPU code generator)
    except ImportError:
        if device_type == "cuda":
            print("torch.compile is off: Triton is not installed (as on Windows); training runs without it")
            return False
    return True


def load_dataset(config: dict, master: bool) -> tuple[dict, Path]:
    """meta.json of the dataset; the default corpus is prepared first if it is missing."""
    folder = Path(config["data_dir"]) / config["dataset"]
    if not (folder / "meta.json").exists():
        import prepare
        if config["dataset"] != prepare.DEFAULT_NAME:
            raise ConfigError(f"no dataset at {folder}; make it with: python prepare.py yourfile.txt "
                              f"--name {config['dataset']}")
        if master:
            print(f"{folder} is missing: preparing the default corpus first")
            prepare.prepare(data_dir=config["data_dir"])
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    for split in ("train", "val"):
        if meta[f"{split}_tokens"] <= config["block_size"]:
            raise ConfigError(f"{folder}/{split}.bin has {meta[f'{split}_tokens']} tokens, fewer than one block of "
                              f"{config['block_size'] + 1}; use a smaller --block_size or a longer text")
    return meta, folder


def get_batch(folder: Path, split: str, dtype: str, batch_size: int, block_size: int,
              generator: torch.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random blocks of `split` as (inputs, targets shifted by one)."""
    # A fresh memmap per batch: keeping one open makes its pages count as the process's memory.
    data = np.memmap(folder / f"{split}.bin", dtype=dtype, mode="r")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    blocks = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in starts]).astype(np.int64))
    x, y = blocks[:, :-1].contiguous(), blocks[:, 1:].contiguous()
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def lr_at(it: int, config: dict, max_iters: int) -> float:
    """Linear warm-up, then cosine decay from learning_rate to min_lr at max_iters."""
    if not config["decay_lr"]:
        return config["learning_rate"]
    if it < config["warmup_iters"]:
        return config["learning_rate"] * (it + 1) / (config["warmup_iters"] + 1)
    progress = min(1.0, (it - config["warmup_iters"]) / max(1, max_iters - config["warmup_iters"]))
    return config["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config["learning_rate"] - config["min_lr"])


@torch.no_grad()
def estimate_loss(model: GPT, folder: Path, meta: dict, config: dict, device: str, autocast) -> dict:
    """Mean loss over eval_iters batches per split; the same batches every time, so evals compare."""
    model.eval()
    losses = {}
    for split in ("train", "val"):
        generator = torch.Generator().manual_seed(config["seed"])
        total = 0.0
        for _ in range(config["eval_iters"]):
            x, y = get_batch(folder, split, meta["dtype"], config["batch_size"], config["block_size"], generator, device)
            with autocast:
                _, loss = model(x, y)
            total += loss.item()
        losses[split] = total / config["eval_iters"]
    model.train()
    return losses


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               next_batch, accumulation: int, autocast, grad_clip: float) -> torch.Tensor:
    """One optimizer step over `accumulation` micro-batches; returns their mean loss (on the device)."""
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    total = 0.0
    for micro_step in range(accumulation):
        x, y = next_batch()
        # Under DDP, gradients are averaged across ranks only in the last micro-step's backward.
        sync = model.no_sync() if ddp and micro_step < accumulation - 1 else nullcontext()
        with sync:
            with autocast:
                _, loss = model(x, y)
            scaler.scale(loss / accumulation).backward()
        total = total + loss.detach().float()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total / accumulation


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash mid-write keeps the previous file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def append_metrics(out_dir: Path, record: dict) -> None:
    with open(out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def plot_losses(out_dir: Path) -> None:
    """loss.png: train and val loss against tokens seen, from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, label in (("loss", "train (batch)"), ("val_loss", "val")):
        points = [(r["tokens"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if key == "val_loss" else None)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats per token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(out_dir / "loss.tmp.png", dpi=100)
    plt.close(fig)
    os.replace(out_dir / "loss.tmp.png", out_dir / "loss.png")


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


def train(config: dict) -> dict:
    """Run training as `config` says; returns the final iteration and losses."""
    # ---- processes and device -------------------------------------------------------------
    ddp = int(os.environ.get("RANK", -1)) != -1  # started by torchrun
    if ddp:
        rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        device = f"cuda:{local_rank}" if torch.cuda.is_available() and config["device"] in ("auto", "cuda") \
            else pick_device(config["device"])
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        if config["gradient_accumulation_steps"] % world_size:
            raise ConfigError(f"gradient_accumulation_steps {config['gradient_accumulation_steps']} must be "
                              f"divisible by the {world_size} processes")
    else:
        rank, local_rank, world_size, device = 0, 0, 1, pick_device(config["device"])
    master = rank == 0
    accumulation = config["gradient_accumulation_steps"] // world_size
    device_type = "cuda" if device.startswith("cuda") else device
    dtype = pick_dtype(config["dtype"], device_type)
    torch.manual_seed(config["seed"] + rank)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = nullcontext() if dtype == "float32" else \
        torch.autocast(device_type=device_type, dtype={"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])

    # ---- data -------------------------------------------------------------------------------
    meta, folder = load_dataset(config, master)
    tokenizer = Tokenizer.from_meta(meta)
    tokens_per_iter = config["batch_size"] * config["block_size"] * accumulation * world_size
    max_iters = config["max_iters"] or math.ceil(config["epochs"] * meta["train_tokens"] / tokens_per_iter)

    # ---- model and optimizer ------------------------------------------------------------------
    out_dir = Path(config["out_dir"])
    checkpoint = None
    iter_num, best_val_loss = 0, float("inf")
    if config["init_from"] == "resume":
        path = out_dir / "last.pt"
        if not path.exists():
            raise ConfigError(f"nothing to resume: {path} does not exist; train with --init_from=scratch first")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model = GPT(GPTConfig(**checkpoint["model_args"]))
        model.load_state_dict(checkpoint["model"])
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        if checkpoint["vocab"]["itos"] != tokenizer.itos:
            raise ConfigError(f"{path} was trained on another vocabulary than {folder}; use its dataset")
    elif config["init_from"] == "scratch":
        model = GPT(GPTConfig(block_size=config["block_size"], vocab_size=tokenizer.vocab_size,
                              n_layer=config["n_layer"], n_head=config["n_head"], n_embd=config["n_embd"],
                              dropout=config["dropout"], bias=config["bias"]))
    else:
        try:
            model = GPT.from_hf_gpt2(config["init_from"])
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot fine-tune from {config['init_from']}: {e}") from None
        if model.config.vocab_size != tokenizer.vocab_size:
            raise ConfigError(f"{config['init_from']} has {model.config.vocab_size} tokens but dataset {folder} has "
                              f"{tokenizer.vocab_size}; prepare it with --vocab <the model's vocab.txt>")
        if config["block_size"] > model.config.block_size:
            raise ConfigError(f"block_size {config['block_size']} is longer than the model's "
                              f"{model.config.block_size} positions; use --block_size={model.config.block_size}")
    model_args = dataclasses.asdict(model.config)
    model.to(device)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    optimizer = model.configure_optimizers(config["weight_decay"], config["learning_rate"],
                                           (config["beta1"], config["beta2"]), device_type)
    batch_generator = torch.Generator().manual_seed(config["seed"])  # shared by all ranks: each takes its rows
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        batch_generator.set_state(checkpoint["rng"]["batch"])
        if master:  # the other ranks' dropout streams are not saved; only rank 0's is restored
            torch.set_rng_state(checkpoint["rng"]["torch"])
            if device_type == "cuda" and "cuda" in checkpoint["rng"]:
                torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
        checkpoint = None  # free the memory
    raw_model = model
    if pick_compile(config["compile"], device_type):
        if master:
            print("compiling the model with torch.compile (takes a minute) ...")
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device_type == "cuda" else None)

    # ---- logging ------------------------------------------------------------------------------
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"{raw_model.get_num_params() / 1e6:.1f}M parameters, {device} {dtype}, {world_size} process(es); "
              f"{tokens_per_iter:,} tokens per iteration, {max_iters:,} iterations = "
              f"{max_iters * tokens_per_iter / meta['train_tokens']:.2f} epochs of {meta['train_tokens']:,} tokens")
    run = None
    if master and config["wandb_log"]:
        import wandb
        mode = wandb_mode()
        run = wandb.init(project=config["wandb_project"], name=config["wandb_run_name"] or
                         f"{config['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}", config=config, mode=mode,
                         dir=str(out_dir))
        if mode == "offline":
            print(f"wandb: no login found, logging offline; upload later with: wandb sync {run.dir.rsplit('/files', 1)[0]}")
    peak_flops = config["peak_flops"] or (peak_flops_for(torch.cuda.get_device_name(device))
                                          if device_type == "cuda" else None)

    def log(record: dict) -> None:
        append_metrics(out_dir, record)
        if run is not None:
            run.log(record, step=record["iter"])

    def make_checkpoint(full: bool) -> dict:
        state = {"model": raw_model.state_dict(), "model_args": model_args, "vocab": tokenizer.to_meta(),
                 "config": config, "iter_num": iter_num, "best_val_loss": best_val_loss}
        if full:  # what resume needs on top of the weights
            rng = {"torch": torch.get_rng_state(), "batch": batch_generator.get_state()}
            if device_type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(device)
            state.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=rng)
        return state

    # Ctrl-C / SIGTERM: finish the step, save, exit cleanly. A second Ctrl-C stops at once.
    stop = {"requested": False}

    def request_stop(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        if master:
            print(f"\n{signal.Signals(signum).name}: finishing this step, then saving (Ctrl-C again to quit now)")

    old_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the next micro-batch (all ranks draw the same offsets, each takes its own)."""
        x, y = get_batch(folder, "train", meta["dtype"], config["batch_size"] * world_size, config["block_size"],
                         batch_generator, device)
        rows = slice(rank * config["batch_size"], (rank + 1) * config["batch_size"])
        return x[rows], y[rows]

    # ---- the loop -------------------------------------------------------------------------------
    last_losses: dict = {}
    t0, timed_iters, loss_iters = time.time(), 0, 0
    loss_sum = torch.zeros((), device=device)
    try:
        while True:
            if iter_num % config["eval_interval"] == 0 or iter_num >= max_iters:
                last_losses = estimate_loss(raw_model, folder, meta, config, device, autocast)
                if not all(map(math.isfinite, last_losses.values())):
                    raise FloatingPointError(f"the loss became {last_losses['train']} at iteration {iter_num}")
                if master:
                    val = last_losses["val"]
                    print(f"iter {iter_num}: train loss {last_losses['train']:.4f}, val loss {val:.4f} "
                          f"({val / math.log(2):.3f} bits/char, perplexity {math.exp(val):.1f})")
                    log({"iter": iter_num, "tokens": iter_num * tokens_per_iter, "train_loss": last_losses["train"],
                         "val_loss": val, "val_bits_per_char": val / math.log(2), "val_perplexity": math.exp(val)})
                    if val < best_val_loss:
                        best_val_loss = val
                        save_checkpoint(make_checkpoint(full=False), out_dir / "ckpt.pt")
                    save_checkpoint(make_checkpoint(full=True), out_dir / "last.pt")
                t0, timed_iters = time.time(), 0  # evaluation time is not training speed
            if iter_num >= max_iters:
                break

            lr = lr_at(iter_num, config, max_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum += train_step(model, optimizer, scaler, next_batch, accumulation, autocast, config["grad_clip"])
            iter_num += 1
            timed_iters += 1
            loss_iters += 1

            if iter_num % config["log_interval"] == 0 and master:
                loss_value = loss_sum.item() / loss_iters
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"the training loss became {loss_value} at iteration {iter_num}")
                elapsed = time.time() - t0
                ms_per_iter = 1000 * elapsed / timed_iters
                record = {"iter": iter_num, "epoch": iter_num * tokens_per_iter / meta["train_tokens"],
                          "tokens": iter_num * tokens_per_iter, "loss": loss_value, "lr": lr,
                          "ms_per_iter": ms_per_iter, "tokens_per_s": tokens_per_iter * timed_iters / elapsed}
                line = (f"iter {iter_num}/{max_iters} (epoch {record['epoch']:.2f}): loss {loss_value:.4f}, "
                        f"lr {lr:.2e}, {ms_per_iter:.0f} ms/iter, {record['tokens_per_s']:,.0f} tokens/s")
                if device_type == "cuda":
                    if peak_flops:
                        fwdbwd = config["batch_size"] * accumulation * timed_iters
                        record["mfu"] = raw_model.estimate_mfu(fwdbwd, elapsed, peak_flops)
                        line += f", MFU {100 * record['mfu']:.1f}%"
                    record["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    line += f", peak memory {record['peak_memory_gb']:.2f} GB"
                print(line)
                log(record)
            if iter_num % config["log_interval"] == 0:
                loss_sum.zero_()
                t0, timed_iters, loss_iters = time.time(), 0, 0

            if ddp:  # every rank must stop at the same step
                flag = torch.tensor(float(stop["requested"]), device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                stop["requested"] = bool(flag.item())
            if stop["requested"]:
                if master:
                    save_checkpoint(make_checkpoint(full=True), out_dir / "last.pt")
                    print(f"saved {out_dir / 'last.pt'} at iteration {iter_num}; resume with:\n"
                          f"  python {' '.join(sys.argv)} --init_from=resume")
                break
        if ddp:
            check_ranks_in_sync(raw_model, master)
    finally:
        for s, handler in old_handlers.items():
            signal.signal(s, handler)
        if master and (out_dir / "metrics.jsonl").exists():
            plot_losses(out_dir)
        if run is not None:
            run.finish()
        if ddp:
            torch.distributed.destroy_process_group()
    return {"iter_num": iter_num, "max_iters": max_iters, "best_val_loss": best_val_loss,
            "train_loss": last_losses.get("train"), "val_loss": last_losses.get("val"),
            "stopped": stop["requested"]}


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
    try:
        config = get_config(DEFAULTS, argv, types=TYPES)
        result = train(config)
    except ConfigError as e:
        exit_with_error(e)
    except FloatingPointError as e:
        exit_with_error(f"{e}; training stopped, the last good checkpoint is kept. "
                        "Lower --learning_rate or use --dtype=bfloat16/float32")
    if not result["stopped"] and result["val_loss"] is not None:
        print(f"done: {result['iter_num']} iterations, final val loss {result['val_loss']:.4f}, "
              f"best {result['best_val_loss']:.4f}")


if __name__ == "__main__":
    main()
