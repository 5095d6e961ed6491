"""The LightningModule: frozen reference, policy update, metrics, checkpoint contents."""

import functools

import lightning as L
import torch

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.losses import DPOLoss
from dpo_lightning.stages.dpo import DPOModule


def _batch():
    return PreferenceCollator(pad_token_id=0)(
        [
            {
                "prompt_ids": [1, 10, 11],
                "completion_ids": [[20, 21, 2], [30, 2]],
                "pairs": [[0, 1]],
                "row_id": 0,
            },
            {
                "prompt_ids": [1, 12],
                "completion_ids": [[22, 23, 2], [31, 32, 33, 2]],
                "pairs": [[0, 1]],
                "row_id": 1,
            },
        ]
    )


def _module(model):
    return DPOModule(
        policy=model,
        loss=DPOLoss(beta=0.1),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
    )


def test_reference_is_frozen_copy_outside_optimizer(tiny_model):
    module = _module(tiny_model)
    ref = module.reference_model
    assert ref is not module.policy
    assert not any(p.requires_grad for p in ref.parameters())
    module.train()
    assert not ref.training and module.policy.training
    opt = module.configure_optimizers()
    opt_params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in module.policy.parameters()}
    assert not opt_params & {id(p) for p in ref.parameters()}


def test_one_step_changes_policy_not_reference(tiny_model):
    module = _module(tiny_model)
    before_ref = {k: v.clone() for k, v in module.reference_model.state_dict().items()}
    before_pol = {k: v.clone() for k, v in module.policy.state_dict().items()}
    opt = module.configure_optimizers()
    module.log_dict = module.log = lambda *a, **k: None  # no trainer attached
    module.train()
    loss = module.training_step(_batch(), 0)
    # Policy == reference at step 0: every margin is 0, so the loss is exactly log 2.
    torch.testing.assert_close(loss, torch.tensor(0.6931472), atol=1e-6, rtol=0)
    loss.backward()
    opt.step()
    for k, v in module.reference_model.state_dict().items():
        assert torch.equal(v, before_ref[k]), k
    changed = [k for k, v in module.policy.state_dict().items() if not torch.equal(v, before_pol[k])]
    assert len(changed) == len(before_pol)


def test_checkpoint_holds_one_copy_of_the_weights(tiny_model, tmp_path):
    module = _module(tiny_model)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    loader = torch.utils.data.DataLoader([0], collate_fn=lambda _: _batch())
    trainer.fit(module, train_dataloaders=loader)
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert any(k.startswith("policy.") for k in state)
    assert not any(k.startswith("reference.") for k in state)
    # Loading re-inserts the (rebuilt) reference, strict loading still works.
    fresh = _module(type(tiny_model)(tiny_model.config))
    ckpt = torch.load(path, weights_only=False)
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"], strict=True)
    for k, v in module.policy.state_dict().items():
        assert torch.equal(fresh.policy.state_dict()[k], v)


def test_gradients_are_freed_after_the_step_not_kept_through_the_next_forward(tiny_model, tmp_path):
    """After each optimizer step the policy has no gradients (they would otherwise sit through the
    next forward beside its activations); within gradient accumulation they are kept."""
    seen = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(sum(p.grad is not None for p in pl_module.policy.parameters()))

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        accumulate_grad_batches=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[Probe()],
    )
    loader = torch.utils.data.DataLoader(range(4), collate_fn=lambda _: _batch())
    trainer.fit(_module(tiny_model), train_dataloaders=loader)
    params = len(list(tiny_model.parameters()))
    assert seen == [0, params, 0, params]  # micro-batches 1 and 3 start a step; 2 and 4 accumulate
