"""The fine-tuning and modern-recipe controls: parameter groups, warm-up, frozen backbone, gradient accumulation,
label smoothing, mixed targets, EMA, RandAugment/TrivialAugment on both pipelines and flip TTA."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import ReduceLROnPlateau

from cellcls.data.batch_augment import BatchAugment
from cellcls.data.mixing import build_mix
from cellcls.data.transforms import build_augment
from cellcls.errors import ConfigError
from cellcls.models import build_model
from cellcls.models.tta import FlipAverage, with_tta
from cellcls.training.callbacks import FreezeBackbone
from cellcls.infra.distributed import DistEnv
from cellcls.training.ema import EMA
from cellcls.training.loop import TrainStep, train_one_epoch
from cellcls.scoring.losses import ClassificationLoss
from cellcls.training.optim import (
    Warmup,
    build_optimizer,
    build_scheduler,
    step_scheduler,
)
from cellcls.infra.runtime import Runtime

CPU = Runtime(torch.device("cpu"), DistEnv(), None, torch.contiguous_format)
ADAMW = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}


def lenet(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model({"name": "lenet", "dropout": 0.0, **kw}, 3, 2, [32, 32])


def batches(n: int, size: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 2, (size,), generator=g)) for _ in range(n)]


def train(net, loader, optimizer, **kw) -> None:
    train_one_epoch(TrainStep(net, net, ClassificationLoss(2), optimizer, torch.amp.GradScaler("cpu", enabled=False),
                              CPU, **kw), loader)


def test_the_head_gets_optim_lr_and_the_backbone_its_scaled_share():
    net = lenet()
    opt = build_optimizer(net, {**ADAMW, "backbone_lr_scale": 0.1})
    head = {id(p) for p in net.classifier.parameters()}
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)  # the first group: the LR the logs report
    for group in opt.param_groups:
        expected = 1e-3 if id(group["params"][0]) in head else 1e-4
        assert group["lr"] == pytest.approx(expected)
        assert all((id(p) in head) == (id(group["params"][0]) in head) for p in group["params"])


def test_biases_and_norm_weights_get_no_weight_decay_when_asked():
    net = build_model({"name": "resnet18"}, 3, 2, [32, 32])
    opt = build_optimizer(net, {**ADAMW, "decay_norm_and_bias": False})
    for group in opt.param_groups:
        assert group["weight_decay"] == (0.05 if all(p.ndim > 1 for p in group["params"]) else 0.0)
        assert len({p.ndim > 1 for p in group["params"]}) == 1
    default = build_optimizer(net, ADAMW)
    assert [g["weight_decay"] for g in default.param_groups] == [0.05]


def test_a_negative_backbone_lr_scale_is_refused_by_name():
    with pytest.raises(ConfigError, match="optim.backbone_lr_scale"):
        build_optimizer(lenet(), {**ADAMW, "backbone_lr_scale": -1})


@pytest.fixture(autouse=True)
def _no_optimizer_steps_here(recwarn):
    """These schedules are stepped without training; torch's reminder about the order does not apply."""
    import warnings

    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step()` before `optimizer.step()`")


def lrs(scheduler, optimizer, epochs: int, metric=lambda e: 1.0) -> list[float]:
    seen = []
    for epoch in range(1, epochs + 1):
        seen.append(optimizer.param_groups[0]["lr"])
        step_scheduler(scheduler, metric(epoch))
    return seen


def test_warmup_climbs_linearly_then_cosine_spans_the_remaining_epochs():
    opt = build_optimizer(lenet(), {**ADAMW, "lr": 0.3})
    sched = build_scheduler(opt, {"name": "cosine", "min_lr": 0.0, "warmup_epochs": 2}, 6, "min")
    assert isinstance(sched, Warmup)
    cosine = [0.3 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(4)]  # T_max: the 4 epochs after warm-up
    assert lrs(sched, opt, 6) == pytest.approx([0.1, 0.2, *cosine], abs=1e-12)


def test_warmup_then_plateau_counts_bad_epochs_only_after_the_warmup():
    opt = build_optimizer(lenet(), {**ADAMW, "lr": 0.2})
    cfg = {"name": "plateau", "factor": 0.5, "patience": 1, "min_lr": 0.0, "threshold": 0.0, "cooldown": 0,
           "warmup_epochs": 1}
    sched = build_scheduler(opt, cfg, 10, "min")
    assert isinstance(sched.after, ReduceLROnPlateau)
    # the metric never improves: the warm-up epoch is not counted; each later epoch is one bad epoch (patience 1)
    assert lrs(sched, opt, 4) == pytest.approx([0.1, 0.2, 0.2, 0.1])


def test_a_warmup_restored_from_its_state_continues_the_same_schedule():
    opt = build_optimizer(lenet(), {**ADAMW, "lr": 0.3})
    cfg = {"name": "cosine", "min_lr": 0.0, "warmup_epochs": 2}
    sched = build_scheduler(opt, cfg, 6, "min")
    lrs(sched, opt, 3)
    opt2 = build_optimizer(lenet(), {**ADAMW, "lr": 0.3})
    sched2 = build_scheduler(opt2, cfg, 6, "min")
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert lrs(sched2, opt2, 3) == pytest.approx(lrs(sched, opt, 3))


def test_warmup_must_end_before_the_last_epoch():
    with pytest.raises(ConfigError, match="scheduler.warmup_epochs"):
        build_scheduler(build_optimizer(lenet(), ADAMW), {"name": "cosine", "min_lr": 0, "warmup_epochs": 5}, 5, "min")


def test_a_frozen_backbone_stays_put_while_the_head_learns_and_thaws_after_its_epochs():
    net = lenet()
    state = SimpleNamespace(job=SimpleNamespace(net=net, runtime=CPU))
    freeze = FreezeBackbone(epochs=1)
    freeze.on_epoch_start(state, 1)
    before = copy.deepcopy(net.state_dict())
    train(net, batches(3, 8), build_optimizer(net, {**ADAMW, "lr": 0.01}))
    after = net.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("features."))
    assert not torch.equal(after["classifier.3.weight"], before["classifier.3.weight"])
    freeze.on_epoch_start(state, 2)
    assert all(p.requires_grad for p in net.parameters())


def test_accumulating_two_batches_takes_the_step_of_one_batch_of_both():
    data = batches(2, 8)
    merged = [(torch.cat([data[0][0], data[1][0]]), torch.cat([data[0][1], data[1][1]]))]
    a, b = lenet(), lenet()
    train(a, data, torch.optim.SGD(a.parameters(), lr=0.1), accumulate=2)
    train(b, merged, torch.optim.SGD(b.parameters(), lr=0.1))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_an_ema_follows_each_optimiser_step_with_its_warm_decay():
    net = lenet()
    ema = EMA(net, decay=0.999)
    start = copy.deepcopy(net)
    train(net, batches(1, 8), torch.optim.SGD(net.parameters(), lr=0.1), ema=ema)
    decay = 1 / 10  # the first update: min(0.999, (1 + 0) / (10 + 0))
    for (name, e), s, p in zip(ema.module.named_parameters(), start.parameters(), net.parameters()):
        torch.testing.assert_close(e, decay * s + (1 - decay) * p, msg=name)
    assert ema.updates == 1 and ema.current_decay() == pytest.approx(2 / 11)


def test_label_smoothing_is_torchs_for_classes_and_the_same_rule_for_one_logit():
    logits, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    torch.testing.assert_close(ClassificationLoss(3, label_smoothing=0.1)(logits, y),
                               F.cross_entropy(logits, y, label_smoothing=0.1))
    one, t = torch.randn(6, 1), torch.tensor([0, 1, 1, 0, 1, 0])
    torch.testing.assert_close(ClassificationLoss(1, label_smoothing=0.2)(one, t),
                               F.binary_cross_entropy_with_logits(one[:, 0], t * 0.8 + 0.1))


def test_mixed_targets_give_the_loss_of_their_class_shares_with_their_class_weights():
    logits, y = torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    weights = torch.tensor([1.0, 3.0])
    soft = torch.tensor([[0.7, 0.3], [0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    loss = ClassificationLoss(2, weights)(logits, soft)
    per_sample = -(soft * logits.log_softmax(1)).sum(1) * (soft @ weights)
    torch.testing.assert_close(loss, per_sample.mean())
    one_hot = F.one_hot(y, 2).float()
    torch.testing.assert_close(ClassificationLoss(2, weights)(logits, one_hot), ClassificationLoss(2, weights)(logits, y))


def test_mixup_and_cutmix_mix_images_and_turn_labels_into_class_shares():
    torch.manual_seed(0)
    images, labels = torch.rand(8, 3, 32, 32), torch.tensor([0, 1] * 4)
    for cfg in ({"mixup": 0.4}, {"cutmix": 1.0}, {"mixup": 0.4, "cutmix": 1.0}):
        mix = build_mix(cfg, 2)
        mixed, soft = mix(images, labels)
        assert mixed.shape == images.shape and soft.shape == (8, 2)
        torch.testing.assert_close(soft.sum(1), torch.ones(8))
        assert not torch.equal(mixed, images) and ((soft > 0) & (soft < 1)).any()
    assert build_mix({"mixup": 0.0, "cutmix": 0.0}, 2) is None


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_an_augment_policy_runs_image_by_image_on_both_pipelines(policy):
    torch.manual_seed(0)
    per_image = build_augment({"policy": policy})
    assert type(per_image[-1]).__name__ == {"randaugment": "RandAugment", "trivialaugment": "TrivialAugmentWide"}[policy]
    images = torch.rand(6, 3, 32, 32)
    out = BatchAugment({"policy": policy})(images)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    changed = [not torch.equal(a, b) for a, b in zip(out, images)]
    assert sum(changed) >= 3  # drawn per image (TrivialAugment's identity op leaves some unchanged)


def test_an_unknown_policy_is_refused_with_the_allowed_ones():
    with pytest.raises(ConfigError, match="augment.policy='autoaugment' is not valid; allowed values: none, randaugment"):
        build_augment({"policy": "autoaugment"})


def test_flip_tta_averages_the_logits_of_the_image_and_its_flips():
    net = lenet().eval()
    x = torch.randn(2, 3, 32, 32)
    expected = (net(x) + net(x.flip(3)) + net(x.flip(2)) + net(x.flip(2).flip(3))) / 4
    torch.testing.assert_close(with_tta(net, "flips")(x), expected)
    torch.testing.assert_close(FlipAverage(net, "hflip")(x), (net(x) + net(x.flip(3))) / 2)
    assert with_tta(net, "none") is net
    with pytest.raises(ConfigError, match="tta='rotate' is not valid"):
        with_tta(net, "rotate")
