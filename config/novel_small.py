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
epochs = 15.0

# The AdamW + cosine recipe these figures were measured with. Muon (the default for runs without a
# config) is not retuned here yet: on this CPU its step costs more, and a 10-minute Muon recipe is unmeasured.
optimizer = "adamw"
lr_schedule = "cosine"
learning_rate = 3e-4
min_lr_ratio = 0.1
warmup_iters = 100
weight_decay = 0.1

eval_interval = 100
eval_iters = 40
log_interval = 10
wandb_log = True
wandb_project = "novelgpt"
