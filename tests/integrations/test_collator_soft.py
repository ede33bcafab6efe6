"""DVSFTCollator(soft=K, spread=...): the batch carries soft vision labels (B, T, K) with their
weights, consistent with the hard labels, and they train through attach and DVSFTTrainer."""

from __future__ import annotations

import pytest
import torch
import transformers

from dvsft_kernels import DVLoss, attach
from dvsft_kernels.integrations import DVSFTCollator, DVSFTTrainer
from tests.integrations.helpers import IGN
from tests.integrations.test_collator import WORDS, sample
from tests.integrations.tiny_models import qwen2_vl_for_processor, qwen2_vl_processor


@pytest.fixture(scope="module")
def proc():
    return qwen2_vl_processor(WORDS)


@pytest.mark.parametrize("spread", [0.0, 0.3])
def test_soft_batch_shapes_weights_and_positions(proc, spread):
    pages = [sample(["alpha", "beta", "gamma"]), sample(["delta", "omega"], seed=1)]
    hard = DVSFTCollator(proc)(pages)
    soft = DVSFTCollator(proc, soft=3, spread=spread)(pages)
    ids, w = soft["vision_labels"], soft["vision_label_weights"]
    B, T = hard["input_ids"].shape
    assert ids.shape == w.shape == (B, T, 3) and w.dtype == torch.float32
    used = ids != IGN
    # the same positions are labeled as with hard labels, weights sum to 1 there, 0 on unused slots
    assert torch.equal(used.any(-1), hard["vision_labels"] != IGN)
    torch.testing.assert_close(w.sum(-1)[used.any(-1)], torch.ones(int(used.any(-1).sum())))
    assert bool((w[~used] == 0).all())
    # text labels unchanged
    assert torch.equal(soft["labels"], hard["labels"])
    # every id used is a word id of its page, and most cells' top id is the hard label
    assert bool((ids[used] != proc.image_token_id).all())
    agree = (ids[..., 0] == hard["vision_labels"])[used.any(-1)].float().mean()
    assert agree > 0.8, agree


def test_bad_soft_options_are_refused(proc):
    with pytest.raises(ValueError, match="soft"):
        DVSFTCollator(proc, soft=0)
    with pytest.raises(ValueError, match="spread"):
        DVSFTCollator(proc, spread=0.2)


def test_soft_batch_trains_through_attach_and_trainer(proc, tmp_path):
    data = [sample(WORDS[i: i + 3], seed=i) for i in range(4)]
    coll = DVSFTCollator(proc, soft=2, spread=0.2)
    model = qwen2_vl_for_processor(proc).train()
    batch = coll(data[:2])
    with attach(model, DVLoss()) as h:
        out = model(**batch)
        out.loss.backward()
        n_vis = int((batch["vision_labels"] != IGN).any(-1).sum())
        assert torch.isfinite(out.loss) and h.last_metrics["vision_tokens"] == n_vis > 0
    model.zero_grad(set_to_none=True)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2,
                                          logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                                          disable_tqdm=True)
    trainer = DVSFTTrainer(model=model, args=args, train_dataset=data, data_collator=coll)
    trainer.train()
    logs = [x for x in trainer.state.log_history if "vision_loss" in x]
    assert len(logs) == 2 and all(x["vision_tokens"] > 0 for x in logs)
