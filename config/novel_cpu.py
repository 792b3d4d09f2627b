# A small model that trains on a 2-core CPU in under 10 minutes and writes recognisable 红楼梦 prose.
#   python train.py config/novel_cpu.py
out_dir = "out-novel-cpu"
dataset = "hongloumeng"

n_layer = 4
n_head = 4
n_embd = 256
block_size = 128
dropout = 0.0

batch_size = 32
gradient_accumulation_steps = 1
max_iters = 2000

learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 100
weight_decay = 0.1
beta2 = 0.99  # small batches: a longer second-moment average is steadier

eval_interval = 250
eval_iters = 20
log_interval = 50
