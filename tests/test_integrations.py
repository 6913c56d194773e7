"""fuseopt in the trainers people use, with the real packages (tiny CPU models, seconds each):
PyTorch Lightning's ``Trainer``, Hugging Face ``accelerate`` and ``transformers``' ``Trainer``, with
fuseopt optimizers and schedulers where torch's would be, resuming from their checkpoints with
the same losses."""

from __future__ import annotations

import warnings

import pytest
import torch

import fuseopt

FUSED_TOL = dict(rtol=1e-5, atol=1e-6)  # fused kernels vs torch's for-loop (see test_parity)


def _data(n=32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=gen)
    return torch.utils.data.TensorDataset(
        x, x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=gen)
    )


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


# ---------------------------------------------------------------------------------- Lightning
def _lightning_module(lib, schedule: str):
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        """No hook overridden but the usual three: Lightning drives optimizer and scheduler."""

        def __init__(self):
            super().__init__()
            self.net = _model()
            self.losses: list[float] = []
            self.lrs: list[float] = []

        def training_step(self, batch, _):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            self.losses.append(loss.item())
            self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
            return loss

        def configure_optimizers(self):
            opt = lib.Adam(
                self.parameters(), lr=0.05, **({} if lib is fuseopt else {"foreach": False})
            )
            if schedule == "onecycle":
                sched = lib.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=16)
                return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
            sched = lib.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0, threshold=0.5)
            return {
                "optimizer": opt,
                "lr_scheduler": {"scheduler": sched, "monitor": "train_loss", "interval": "epoch"},
            }

    return Module()


def _fit(module, epochs, root, ckpt_path=None):
    import lightning.pytorch as pl

    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(_data(), batch_size=8, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and logging
        trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("schedule", ["onecycle", "plateau"])
def test_lightning_fit_and_resume(schedule, tmp_path):
    """``Trainer.fit`` with a fuseopt optimizer and scheduler gives torch's losses and lrs;
    resumed from a checkpoint after two epochs, it continues with the same losses and lrs."""
    pytest.importorskip("lightning")
    runs = {}
    for lib in (fuseopt, torch.optim):
        module = _lightning_module(lib, schedule)
        _fit(module, 4, tmp_path)
        runs[lib.__name__] = module
    ours, theirs = runs["fuseopt"], runs["torch.optim"]
    assert len(ours.losses) == 16
    torch.testing.assert_close(ours.losses, theirs.losses, **FUSED_TOL)
    torch.testing.assert_close(ours.lrs, theirs.lrs, **FUSED_TOL)
    assert len(set(ours.lrs)) > 1, "the schedule changed the lr"

    first = _lightning_module(fuseopt, schedule)
    trainer = _fit(first, 2, tmp_path)
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)
    resumed = _lightning_module(fuseopt, schedule)
    _fit(resumed, 4, tmp_path, ckpt_path=path)
    assert first.losses + resumed.losses == ours.losses
    assert first.lrs + resumed.lrs == ours.lrs


# ---------------------------------------------------------------------------------- accelerate
def _accelerated(state_dir=None, steps=(0, 8)):
    """Train with ``gradient_accumulation_steps=2`` over micro-batches ``steps``; load the state
    saved in ``state_dir`` first (if given). Returns (losses, lrs, accelerator)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    set_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = _model()
    opt = fuseopt.AdamW(model.parameters(), lr=0.05)
    sched = fuseopt.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=4)
    loader = torch.utils.data.DataLoader(_data(), batch_size=4, shuffle=False)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    if state_dir is not None:
        accelerator.load_state(state_dir)
    batches = list(loader)
    losses, lrs = [], []
    for x, y in batches[steps[0] : steps[1]]:
        with accelerator.accumulate(model):
            loss = torch.nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
        losses.append(loss.item())
        lrs.append(opt.param_groups[0]["lr"])
    return losses, lrs, accelerator


def test_accelerate_accumulates_saves_and_resumes(tmp_path):
    """``accelerate.prepare`` wraps a fuseopt scheduler: under gradient accumulation it steps once
    per optimizer step (OneCycleLR's four steps over eight micro-batches, no "Tried to step"
    error); ``save_state`` saves it, and ``load_state`` resumes with the same lrs and losses."""
    pytest.importorskip("accelerate")
    from accelerate.scheduler import AcceleratedScheduler

    losses, lrs, accelerator = _accelerated()
    (sched,) = accelerator._schedulers
    assert isinstance(sched, AcceleratedScheduler)
    assert sched.scheduler.last_epoch == 4  # stepped at the 4 optimizer steps only
    # the lr of a OneCycleLR stepped once per optimizer step, held over each accumulation
    alone = fuseopt.lr_scheduler.OneCycleLR(
        fuseopt.AdamW(_model().parameters(), lr=0.05), max_lr=0.1, total_steps=4
    )
    expected = [alone.get_last_lr()[0]]
    for _ in range(4):
        alone.optimizer.step()
        alone.step()
        expected += [alone.get_last_lr()[0]] * 2
    assert lrs == expected[:8]

    half, _, accelerator = _accelerated(steps=(0, 4))
    accelerator.save_state(tmp_path / "state")
    assert list((tmp_path / "state").glob("scheduler*.bin"))
    rest, rest_lrs, _ = _accelerated(tmp_path / "state", steps=(4, 8))
    assert half + rest == losses
    assert rest_lrs == lrs[4:]


# ---------------------------------------------------------------------- Hugging Face Trainer
def _hf_run(make_optimizer, tmp_path):
    """A tiny regression trained by transformers' ``Trainer`` with the given optimizer (lr
    scheduler: constant), evaluated every 4 steps; the losses it logged, the mode the optimizer
    was in at each step and after evaluating, and the final params."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _model()

        def forward(self, x, labels):
            return {"loss": torch.nn.functional.mse_loss(self.net(x), labels)}

    def collate(rows):
        return {"x": torch.stack([r[0] for r in rows]), "labels": torch.stack([r[1] for r in rows])}

    model = Net()
    opt = make_optimizer(model.parameters())
    modes: list[tuple[str, bool]] = []

    # the mode when each step runs (the Trainer switches it inside its training step)
    opt.register_step_pre_hook(
        lambda o, args, kwargs: modes.append(("step", o.param_groups[0]["train_mode"]))
    )

    class Modes(TrainerCallback):
        def on_evaluate(self, args, state, control, **kwargs):
            modes.append(("evaluate", opt.param_groups[0]["train_mode"]))

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8,
        per_device_eval_batch_size=8, eval_strategy="steps", eval_steps=4, logging_steps=1,
        report_to=[], use_cpu=True, save_strategy="no", lr_scheduler_type="constant",
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=_data(), eval_dataset=_data(16),
        data_collator=collate, optimizers=(opt, None), callbacks=[Modes()],
    )  # fmt: skip
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    return losses, evals, modes, [p.detach().clone() for p in model.parameters()]


def test_hf_trainer_switches_schedule_free_modes(tmp_path):
    """transformers' ``Trainer`` calls ``optimizer.train()`` before training steps and
    ``optimizer.eval()`` before evaluating where the optimizer has them: fuseopt's
    ``AdamWScheduleFree`` steps in train mode, is evaluated on the averaged params, and gives
    the numbers of the schedulefree package's ``AdamWScheduleFree`` in the same run."""
    pytest.importorskip("transformers", minversion="5.0")
    schedulefree = pytest.importorskip("schedulefree")
    ours = _hf_run(lambda ps: fuseopt.AdamWScheduleFree(ps, lr=0.05, warmup_steps=2), tmp_path)
    theirs = _hf_run(
        lambda ps: schedulefree.AdamWScheduleFree(ps, lr=0.05, warmup_steps=2, foreach=False),
        tmp_path,
    )
    losses, evals, modes, params = ours
    assert len(losses) == 12 and len(evals) == 3
    assert all(train for what, train in modes if what == "step"), modes
    assert [train for what, train in modes if what == "evaluate"] == [False] * 3, modes
    assert losses[-1] < losses[0]
    assert modes == theirs[2]
    torch.testing.assert_close(losses, theirs[0], **FUSED_TOL)
    torch.testing.assert_close(evals, theirs[1], **FUSED_TOL)
    for p, q in zip(params, theirs[3]):
        torch.testing.assert_close(p, q, **FUSED_TOL)
