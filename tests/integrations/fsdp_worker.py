"""Worker for test_attach's FSDP2 check (torch.distributed.run, gloo, CPU): the head weight is a
DTensor shard; attach() gathers it with .full_tensor(), and the gradients reach every shard."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, sys.argv[3])

from torch.distributed.fsdp import fully_shard

from dvsft_kernels import attach
from tests.integrations.helpers import make_targets
from tests.integrations.tiny_models import ALL_FAMILIES


def main():
    family, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    tiny = ALL_FAMILIES[family]()
    model = tiny.model.train()
    batch = tiny.batch(2)
    labels, vision = make_targets(batch)
    for layer in model.get_decoder().layers:
        fully_shard(layer)
    head = model.get_output_embeddings()
    if head.weight is not model.get_input_embeddings().weight:
        # its own unit, resharded after its forward: in attach's hook the weight is a DTensor shard again
        fully_shard(head, reshard_after_forward=True)
    fully_shard(model)
    assert hasattr(model.get_output_embeddings().weight, "full_tensor")  # sharded: a DTensor
    with attach(model):
        res = model(**batch, labels=labels, vision_labels=vision if tiny.multimodal else None)
        res.loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    if dist.get_rank() == 0:
        torch.save({"loss": res.loss.detach(), "grads": grads}, f"{out}/fsdp.pt")
    dist.barrier()  # neither rank tears gloo down while the other still talks to it
    dist.destroy_process_group()
    # Leave without C++ static teardown: gloo's transport threads can abort the process
    # ("terminate called without an active exception") after a clean run. Results are on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
