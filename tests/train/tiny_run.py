"""The smallest complete training run (3 SFT + 2 GRPO steps) that the trainer tests share."""

TINY = [
    # The 2-layer model on 56-px images of every task: the default run's 168-px demo is too slow here.
    "model.preset=tiny_qwen2_vl", "data.image_size=[56,56]", "data.tasks=null",
    "data.num_examples=64", "data.batch_size=2", "data.group_size=2", "data.length_buckets=[128]",
    "sparsity.p_grid=[0.9,0.95]", "sparsity.min_probes=4",
    "sft.steps=3", "sft.batch_size=4", "sft.warmup_steps=1",
    "rl.steps=2", "rl.max_new_tokens=4", "rl.warmup_steps=0",
    "eval.num_examples=4", "eval.batch_size=4", "eval.p_list=[1.0,0.9]",
    "checkpoint.save_every=1", "checkpoint.keep_last=10", "checkpoint.async_save=false",
    "log.progress=none", "log.tensorboard=false",
]
MESH_222 = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
