# A small model that trains on a 2-core CPU in 10 minutes and writes recognisable 红楼梦 prose.
#   python train.py config/novel_cpu.py
out_dir = "out-novel-cpu"
dataset = "hongloumeng"  # or your own: python prepare.py mynovel.txt --name mynovel, then --dataset=mynovel

n_layer = 4
n_head = 4
n_embd = 256
block_size = 128
dropout = 0.0  # at this budget dropout cost more than it gave (and turns off the fused CPU attention kernel)

# Small batches: with a fixed 10 minutes, more (noisier) steps learn more than fewer big ones.
batch_size = 8
gradient_accumulation_steps = 1

# Length: whatever fits 10 minutes on this machine, compiling and evaluations included (the run times its
# first steps and plans its iterations, so a slower CPU gets fewer, not a longer wait), but never more
# than `epochs` passes over the text: a short story or a diary is not trained into memorisation.
time_budget = 580
max_iters = 0
epochs = 6.0
patience = 2  # evaluations without a better val loss: say the model is memorising, and stop there
early_stop = True

# Muon for the blocks' matrices, AdamW for the embeddings and LayerNorm; warm-up-stable-decay, with the
# decay over the last 30% down to zero. --optimizer=adamw --lr_schedule=cosine is the old recipe.
optimizer = "muon"
muon_lr = 0.02
learning_rate = 6e-3  # AdamW's rate for the embeddings, biases and LayerNorm: 6e-3 beat 3e-3 by 0.06 nats
lr_schedule = "wsd"
decay_frac = 0.3
min_lr_ratio = 0.0
warmup_iters = 50
weight_decay = 0.1
beta2 = 0.99  # small batches: a longer second-moment average is steadier

compile = True  # on a CPU too: about 1.5x faster steps for this model, after ~20 s of compiling
eval_interval = 250
eval_iters = 20
log_interval = 50
