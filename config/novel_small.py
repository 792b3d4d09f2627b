# Our users' GPT2-Chinese model (config/model_config_small.json): 10 layers, 12 heads, 768 wide,
# context 512, vocabulary 13317, on one 8 GB GPU.
#   python train.py config/novel_small.py
# Their run: micro-batch 2 x 512, gradient accumulation 4, 15 epochs. Here the micro-batch is
# 8 x 512 (4x theirs, which bf16 autocast and the flash attention kernel make fit in 8 GB) with
# the same accumulation, so one step sees 16,384 tokens.
out_dir = "out-novel-small"
dataset = "hongloumeng"  # or your own: python prepare.py mynovel.txt --name mynovel

n_layer = 10
n_head = 12
n_embd = 768
block_size = 512
dropout = 0.1

batch_size = 8
gradient_accumulation_steps = 4

# Length and stopping. 85M parameters on one 535k-character novel: GPT2-Chinese's 15 epochs memorise it
# (their users report a train loss of 0.003 and samples copied from the book). Here at most 6 epochs, and the
# run stops when the val loss has not improved for 3 evaluations (two epochs); ckpt.pt is the best one.
# How 6 was chosen: on this CPU the scaled-down proxy (4 x 256, Muon + WSD) was still improving on the whole
# val split at 1.5 epochs of 红楼梦 and at 4-5 epochs of its first 100k characters, so fewer would stop
# early for nothing; patience guards the rest. Not yet measured on this 85M shape (no GPU so far).
epochs = 6.0
patience = 3
early_stop = True

# Muon for the blocks' matrices, AdamW for the embeddings and LayerNorm; warm-up-stable-decay to zero.
optimizer = "muon"
muon_lr = 0.02
learning_rate = 3e-3  # AdamW's rate for the embeddings (6e-3 was better on the small CPU model; unmeasured here)
lr_schedule = "wsd"
decay_frac = 0.3
min_lr_ratio = 0.0
warmup_iters = 20
weight_decay = 0.1

eval_interval = 16  # about half an epoch of 红楼梦 at 16,384 tokens per step
eval_iters = 40
log_interval = 10
wandb_log = True
wandb_project = "novelgpt"
