"""Worker for test_attach's DeepSpeed ZeRO-3 check (torch.distributed.run, gloo, CPU): outside the head's
forward its weight is an empty partition; attach() gathers it for the loss and dW reaches ZeRO-3's
gradient partitions. argv: family, out dir, repo root."""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, sys.argv[3])
import deepspeed
from deepspeed.utils import safe_get_full_grad

from dvsft_kernels import attach
from tests.integrations.helpers import make_targets
from tests.integrations.tiny_models import ALL_FAMILIES

family, out = sys.argv[1], sys.argv[2]
deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=60))
torch.set_num_threads(1)
tiny = ALL_FAMILIES[family]()
model = tiny.model.train()
batch = tiny.batch(2)
labels, vision = make_targets(batch)
cfg = {
    "train_micro_batch_size_per_gpu": 2,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "optimizer": {"type": "SGD", "params": {"lr": 1.0}},
    "zero_allow_untested_optimizer": True,
}
eng, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())
w = model.get_output_embeddings().weight
assert w.numel() == 0 and hasattr(w, "ds_id")  # partitioned
with attach(eng):
    res = eng(**batch, labels=labels, vision_labels=vision if tiny.multimodal else None)
    eng.backward(res.loss)
grads = {n: safe_get_full_grad(p) for n, p in model.named_parameters()}
grads = {n: g.clone() for n, g in grads.items() if g is not None}
if dist.get_rank() == 0:
    torch.save({"loss": res.loss.detach(), "grads": grads}, f"{out}/ds.pt")
dist.barrier()
dist.destroy_process_group()
# Leave without C++ static teardown: gloo's transport threads can abort the process after a clean
# run ("terminate called without an active exception"). Results are on disk.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
