"""Worker for test_trainer's multi-process checks (launched with torch.distributed.run, gloo, CPU):
one optimizer step of DVSFTTrainer; rank 0 saves the parameter deltas and the first log row.

argv: out, repo root, then optionally a JSON spec {"ga": int, "samples": [[pre, post, n_text, vis_every]]}
(`_spec_samples` of test_trainer; n_text = vis_every = 0 is a sample with no targets at all). Sampling is
sequential, so with one sample per micro-batch rank r gets samples r, r + world, r + 2 world, ..."""

import json
import os
import sys
from datetime import timedelta

import torch

sys.path.insert(0, sys.argv[2])

from dvsft_kernels import DVLoss
from dvsft_kernels.integrations import DVSFTTrainer
from tests.integrations.test_trainer import _args, _samples, _spec_samples, collate
from tests.integrations.tiny_models import qwen2_vl


def main():
    torch.set_num_threads(1)
    out = sys.argv[1]
    spec = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
    tiny = qwen2_vl()
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    data = _samples(tiny) if spec is None else _spec_samples(tiny, spec["samples"])
    ga = 1 if spec is None else spec["ga"]
    # a collective that waits longer than ddp_timeout fails the run instead of hanging it
    args = _args(
        out, 1, ga, ddp_backend="gloo", logging_steps=1, ddp_timeout=60, train_sampling_strategy="sequential"
    )
    seen = []  # targets of each micro-batch this rank collated

    def counting_collate(features):
        b = collate(features)
        seen.append(int((b["labels"] != -100).sum() + (b["vision_labels"] != -100).sum()))
        return b

    trainer = DVSFTTrainer(
        model=tiny.model.train(),
        args=args,
        train_dataset=data,
        data_collator=counting_collate,
        loss=DVLoss(vision_weight=0.5),
    )
    assert args.world_size > 1
    trainer.train()
    with open(f"{out}/seen{args.process_index}.json", "w") as f:
        json.dump(seen, f)
    if args.process_index == 0:
        log = next(x for x in trainer.state.log_history if "loss" in x)
        torch.save(
            {"delta": {n: p.detach() - before[n] for n, p in tiny.model.named_parameters()}, "log": log},
            f"{out}/rank0.pt",
        )
    if torch.distributed.is_initialized():  # neither rank tears gloo down while the other still talks to it
        torch.distributed.monitored_barrier(timeout=timedelta(seconds=60))
        torch.distributed.destroy_process_group()
    # Leave without C++ static teardown: gloo's transport threads can abort the process
    # ("terminate called without an active exception") after a clean run. Results are on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
