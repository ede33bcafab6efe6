"""Worker for test_trainer's two-process check (launched with torch.distributed.run, gloo, CPU):
one optimizer step of DVSFTTrainer with one sample per rank; rank 0 saves the parameter deltas."""

import sys

import torch

sys.path.insert(0, sys.argv[2])

from dvsft_kernels import DVLoss
from dvsft_kernels.integrations import DVSFTTrainer
from tests.integrations.test_trainer import _args, _samples, collate
from tests.integrations.tiny_models import qwen2_vl


def main():
    torch.set_num_threads(1)
    out = sys.argv[1]
    tiny = qwen2_vl()
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    data = _samples(tiny)
    args = _args(out, 1, 1, ddp_backend="gloo", logging_steps=1)
    trainer = DVSFTTrainer(
        model=tiny.model.train(),
        args=args,
        train_dataset=data,
        data_collator=collate,
        loss=DVLoss(vision_weight=0.5),
    )
    assert args.world_size == 2
    trainer.train()
    if args.process_index == 0:
        log = next(x for x in trainer.state.log_history if "loss" in x)
        torch.save(
            {"delta": {n: p.detach() - before[n] for n, p in tiny.model.named_parameters()}, "log": log},
            f"{out}/rank0.pt",
        )
    if torch.distributed.is_initialized():  # neither rank tears gloo down while the other still talks to it
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
