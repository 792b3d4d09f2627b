"""train.py's settings: every key with its default, the up-front check, and the objects the library modules
take instead of the settings dict (GPTConfig, OptimizerSettings, Schedule, TrainingShape). bench.py reads them
here too, so no script imports another.
"""
from __future__ import annotations

from configurator import Options, UserError
from novelgpt.files import check_path_names
from novelgpt.footprint import TrainingShape
from model import GPTConfig
from novelgpt.optim import OptimizerSettings, Schedule

TYPES = dict(compile=bool)  # keys whose default None means auto
DEFAULTS = Options(
    # data and output
    dataset=("hongloumeng", "folder under data_dir written by prepare.py"),
    data_dir=("data", "parent folder of the prepared datasets"),
    out_dir=("out", "where ckpt.pt, last.pt, metrics.jsonl and loss.png go"),
    init_from=("scratch", "'scratch', 'resume' (out_dir/last.pt), a GPT2-Chinese / HF GPT-2 model folder, or a .pt "
                         "file or run folder whose weights a new run fine-tunes"),
    overwrite=(False, "True: a new run may replace the trained model already in out_dir"),
    # model (vocab_size comes from the dataset)
    n_layer=(10, "transformer blocks"),
    n_head=(12, "attention heads per block"),
    n_embd=(768, "width of the residual stream"),
    block_size=(512, "context length in tokens (characters)"),
    dropout=(0.1, "dropout rate in training; 0 = off"),
    bias=(True, "biases in Linear and LayerNorm, as in GPT-2 (a Hugging Face export needs them)"),
    used_vocab_head=(True, "from scratch, the LM head trains on the tokens the text uses plus one shared row (faster)"),
    ngram_order=(5, "the novel's memory: a modified Kneser-Ney n-gram of the training text of this order (0 = "
                    "off), mixed with the GPT per character; its weights are fitted on val at the end of training"),
    ngram_train=(False, "train the GPT through the mixture (the n-gram with leave-one-out counts on training text)"),
    ngram_train_weight=(0.5, "the memory's weight in that training loss"),
    # batch: tokens per optimizer step = batch_size * block_size * gradient_accumulation_steps
    batch_size=(8, "rows of one micro-batch (per process)"),
    gradient_accumulation_steps=(4, "in total, divided among the processes under torchrun"),
    gpu_memory=("", "'auto' (free GPU memory) or a size ('8GB'): the largest micro-batch that fits, same tokens/step"),
    # length: max_iters if it is above 0, else epochs over the training tokens; with time_budget (seconds of
    # wall time, compiling and evaluations included) that is an upper bound, and the run plans its length to end
    # within the budget on this machine
    max_iters=(0, "optimizer steps; 0: from epochs"),
    epochs=(15.0, "passes over the training tokens when max_iters is 0"),
    time_budget=(0.0, "seconds of wall time for the whole run; 0 = off"),
    # optimizer
    optimizer=("muon", "muon (Muon for the blocks' matrices, AdamW for the rest) or adamw"),
    muon_lr=(0.02, "Muon's peak rate"),
    muon_momentum=(0.95, "Muon's momentum"),
    muon_weight_decay=(0.0, "Muon's weight decay"),
    learning_rate=(3e-4, "AdamW's peak rate"),
    # schedule, the same curve for every rate: warm-up, then 'cosine' decay, or 'wsd' (stable, then a linear
    # decay over the last decay_frac of the run), down to min_lr_ratio of the peak
    lr_schedule=("wsd", "wsd (warm-up, stable, linear decay) or cosine"),
    decay_frac=(0.3, "wsd: the share of the run the decay takes"),
    min_lr_ratio=(0.1, "the rate at the end, as a share of the peak"),
    warmup_iters=(200, "iterations of linear warm-up"),
    decay_lr=(True, "False: the peak rate throughout (after warm-up)"),
    weight_decay=(0.1, "AdamW's, on matrices and embeddings only"),
    beta1=(0.9, "AdamW's beta1"),
    beta2=(0.95, "AdamW's beta2"),
    grad_clip=(1.0, "clip the gradients' global norm to this; 0 = off"),
    # evaluation, logging, checkpoints
    eval_interval=(250, "iterations between evaluations (and checkpoints)"),
    eval_iters=(40, "batches per evaluation"),
    patience=(0, "evaluations without a better val loss before saying the model memorises the text; 0 = off"),
    early_stop=(False, "with patience: stop training there (the best checkpoint is kept)"),
    log_interval=(10, "iterations between log lines"),
    wandb_log=(False, "send the metrics to wandb too"),
    wandb_project=("novelgpt", "wandb project name"),
    wandb_run_name=("", "empty: '<dataset>-<time>'"),
    # system
    device=("auto", "'auto' (CUDA, else MPS, else CPU), 'cpu', 'cuda', 'cuda:1', 'mps'"),
    dtype=("auto", "'auto', 'float32', 'bfloat16', 'float16'"),
    compile=(None, "None: auto (on for CUDA on Linux); True or False to force"),
    peak_flops=(0.0, "the GPU's dense bf16 peak FLOP/s for MFU; 0: look it up by GPU name"),
    seed=(1337, "seed of the weights and the data order"),
    estimate_memory=(False, "print the memory this run needs (no GPU or dataset needed) and exit"),
)
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias")  # fixed once a model exists


def check_config(config: dict) -> None:
    """Every setting checked up front, so a mistake is one line before any work, not a traceback later."""
    positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps",
                "eval_interval", "eval_iters", "log_interval", "learning_rate")
    for key in positive:
        if config[key] <= 0:
            raise UserError(f"--{key} must be above 0, got {config[key]}")
    for key in ("max_iters", "warmup_iters", "min_lr_ratio", "weight_decay", "grad_clip", "peak_flops", "patience",
                "muon_lr", "muon_weight_decay", "time_budget"):
        if config[key] < 0:
            raise UserError(f"--{key} must be 0 or more, got {config[key]}")
    if config["max_iters"] == 0 and config["epochs"] <= 0:
        raise UserError(f"--epochs must be above 0 (or set --max_iters), got {config['epochs']}")
    if not 0 <= config["dropout"] < 1:
        raise UserError(f"--dropout must be in [0, 1), got {config['dropout']}")
    for key in ("beta1", "beta2"):
        if not 0 <= config[key] < 1:
            raise UserError(f"--{key} must be in [0, 1), got {config[key]}")
    for key, choices in (("optimizer", ("muon", "adamw")), ("lr_schedule", ("wsd", "cosine"))):
        if config[key] not in choices:
            raise UserError(f"--{key} must be {' or '.join(choices)}, got {config[key]!r}")
    if not 0 < config["decay_frac"] <= 1 or not 0 <= config["muon_momentum"] < 1:
        raise UserError("--decay_frac must be in (0, 1] and --muon_momentum in [0, 1)")
    if not 0 <= config["ngram_order"] <= 12:
        raise UserError(f"--ngram_order must be in 0..12 (0 = no memory), got {config['ngram_order']}")
    if not 0 < config["ngram_train_weight"] < 1:
        raise UserError(f"--ngram_train_weight must be in (0, 1), got {config['ngram_train_weight']}")
    if config["ngram_train"] and not config["ngram_order"]:
        raise UserError("--ngram_train needs the memory: give --ngram_order above 0")
    if config["n_embd"] % config["n_head"]:
        raise UserError(f"--n_embd {config['n_embd']} must be a multiple of --n_head {config['n_head']}")
    for key in ("dataset", "out_dir", "data_dir"):
        if not config[key]:
            raise UserError(f"--{key} must not be empty")
        check_path_names(config[key], f"--{key}")
    if config["seed"] < 0 or config["seed"] >= 2**63:
        raise UserError(f"--seed must be in 0..2**63-1, got {config['seed']}")


def gpt_config(config: dict, vocab_size: int) -> GPTConfig:
    """The model that config's shape keys describe, for a vocabulary of vocab_size."""
    return GPTConfig(block_size=config["block_size"], vocab_size=vocab_size, n_layer=config["n_layer"],
                     n_head=config["n_head"], n_embd=config["n_embd"], dropout=config["dropout"], bias=config["bias"])


def optimizer_settings(config: dict) -> OptimizerSettings:
    return OptimizerSettings(**{key: config[key] for key in OptimizerSettings.__dataclass_fields__})


def schedule(config: dict) -> Schedule:
    return Schedule(**{key: config[key] for key in Schedule.__dataclass_fields__})


def training_shape(config: dict, vocab_size: int) -> TrainingShape:
    """What footprint.py estimates for config's run."""
    return TrainingShape(gpt_config(config, vocab_size), config["batch_size"], config["gradient_accumulation_steps"],
                         config["optimizer"])
