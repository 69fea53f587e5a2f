"""The semi-supervised trainer on generated data: every preset, non-finite steps, the method fixes.

Resume after SIGKILL is tested in tests/test_resume.py.
"""

import inspect
import re
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from scripts.engines import SemiSupervisedTrainer, TrainingDivergedError, WeightAverage
from scripts.errors import ConfigError
from tests.helpers import assert_same

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "bundle" / "configs" / "train.json"

TINY = {
    "encoder_name": "vit_tiny",
    "encoder_kwargs": {"depth": 1},
    "skip_channels": [16, 8, 8],
    "decoder_channels": [16, 16, 8, 8],
    "embed_dim": 32,
    "roi_size": [32, 32],
    "labeled_batch_size": 2,
    "unlabeled_batch_size": 2,
    "text_cfg": {"layers": 1},
    "pixels_per_class": 32,
    "confidence_threshold": 0.0,  # every pseudo-label counts, so the unsupervised terms are non-zero at once
}


def parser_for(demo_data, tmp_path, **overrides):
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    settings = {**TINY, "datalist": str(demo_data), "ckpt_dir": str(tmp_path / "models"),
                "output_dir": str(tmp_path / "runs"), **overrides}
    for key, value in settings.items():
        parser[key] = value
    return parser


@pytest.mark.parametrize("method", ["supervised", "fixmatch", "unimatch", "mpamatch_img", "mpamatch_txt", "mpamatch"])
def test_every_preset_trains(method, demo_data, tmp_path):
    parser = parser_for(demo_data, tmp_path, method=method, num_epochs=1)
    trainer = parser.get_parsed_content("train#trainer")
    trainer.state.epoch_length = 2  # two iterations are enough to exercise the whole step
    network = parser.get_parsed_content("network")
    before = {k: v.clone() for k, v in network.state_dict().items()}
    trainer.run()
    output = trainer.state.output[0]  # one item, as MONAI's decollated trainer output
    assert set(output) == {"loss", "loss_x", "loss_s1", "loss_s2", "loss_fp", "loss_img", "loss_txt", "mask_ratio", "skipped"}
    assert all(isinstance(v, float) for v in output.values())
    config = trainer.method
    assert (output["loss_s1"] > 0) == (config.weight_s1 > 0)
    assert (output["loss_s2"] > 0) == (config.weight_s2 > 0)
    assert (output["loss_fp"] > 0) == (config.weight_fp > 0)
    assert (output["loss_txt"] > 0) == (config.lambda_txt > 0)
    if config.lambda_img > 0:  # the bank fills after the first iteration, so the second one has an image loss
        assert parser.get_parsed_content("train#prototype_bank").ready and output["loss_img"] > 0
    else:
        assert output["loss_img"] == 0
    changed = any(not torch.equal(before[k], v) for k, v in network.state_dict().items())
    assert changed and output["skipped"] == 0.0


def test_the_trainer_takes_the_method_train_json_resolves_once(demo_data, tmp_path):
    parser = parser_for(demo_data, tmp_path, method="mpamatch", lambda_txt=0.3, num_epochs=1)
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.method is parser.get_parsed_content("train#method_config")
    assert (trainer.method.name, trainer.method.lambda_img, trainer.method.lambda_txt) == ("mpamatch", 0.1, 0.3)
    assert not hasattr(trainer, "method_name")
    parser = parser_for(demo_data, tmp_path, method="unimatch", num_epochs=1)
    parser["train#trainer#method"] = "unimatch"  # a preset name is resolved in one place only: method_config
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("train#trainer")
    cause = err.value if isinstance(err.value, ConfigError) else err.value.__cause__
    assert isinstance(cause, ConfigError) and "pass a resolved method" in str(cause)
    assert "lambda_img" not in inspect.signature(SemiSupervisedTrainer).parameters  # weights live in the method


def test_non_finite_loss_is_skipped_then_stops(demo_data, tmp_path):
    parser = parser_for(demo_data, tmp_path, method="unimatch", num_epochs=2, max_skipped_steps=2)
    trainer = parser.get_parsed_content("train#trainer")
    network = parser.get_parsed_content("network")
    def poison(module, inputs, output):
        return output * float("nan") if module.training else output

    handle = network.segmentation_head.register_forward_hook(poison)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    with pytest.raises(TrainingDivergedError, match="2 consecutive iterations had a non-finite loss"):
        trainer.run()
    handle.remove()
    assert trainer.state.skipped_steps == 2
    for key, value in network.state_dict().items():
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(before[key], value), f"{key} changed although every step was skipped"
    assert not (tmp_path / "models" / "checkpoint.pt").exists()


def test_single_non_finite_step_is_counted_and_training_goes_on(demo_data, tmp_path):
    parser = parser_for(demo_data, tmp_path, method="unimatch", num_epochs=1)
    trainer = parser.get_parsed_content("train#trainer")
    trainer.state.epoch_length = 2
    network = parser.get_parsed_content("network")
    calls = {"n": 0}

    def poison_first(module, inputs, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] == 1:
                return output * float("nan")
        return output

    network.segmentation_head.register_forward_hook(poison_first)
    trainer.run()
    assert trainer.state.skipped_steps == 1 and trainer.state.consecutive_skips == 0
    assert trainer.state.output[0]["skipped"] == 0.0


# ------------------------------------------------------------------------------------------ method fixes (review)
def _contrast_inputs(trainer, seed=0):
    """Labeled and strong-view hidden maps of the trainer's projection head, their whole-map embeddings, targets and
    keep masks (2 x hidden x 6 x 6 each)."""
    head = trainer.network.projection_head
    g = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(2, head.layers[3].in_channels, 6, 6, generator=g).relu() for _ in range(2)]
    targets = [torch.randint(0, 2, (2, 6, 6), generator=g) for _ in range(2)]
    keeps = [torch.rand(2, 6, 6, generator=g) > 0.2 for _ in range(2)]
    with torch.no_grad():
        emb = [head.embed(h) for h in hidden]
    return hidden, emb, targets, keeps


def test_batch_prototypes_pool_every_valid_labeled_pixel_not_the_infonce_sample(demo_data, tmp_path):
    parser = parser_for(demo_data, tmp_path, method="mpamatch_img", embed_dim=8, pixels_per_class=2)
    trainer = parser.get_parsed_content("train#trainer")
    hidden, emb, targets, keeps = _contrast_inputs(trainer)
    trainer._contrast(hidden, targets, keeps, 2, {})
    means, present = trainer.state.prototype_batch
    # The expected means come from the whole-map embeddings: the trainer projects only the pixels it uses.
    pixels = emb[0].permute(0, 2, 3, 1).reshape(-1, 8)
    target, keep = targets[0].reshape(-1), keeps[0].reshape(-1)
    for c in range(2):
        chosen = pixels[keep & (target == c)]
        assert chosen.shape[0] > 2  # more pixels than the InfoNCE sample keeps per class
        expected = torch.nn.functional.normalize(chosen.mean(0), dim=0)
        assert torch.allclose(means[c], expected, atol=1e-6), f"class {c} prototype is not the mean of all its pixels"
    assert present.all()


def _contrast_trainer(demo_data, tmp_path, method, pixels_per_class, seed):
    """A trainer with embed_dim 8, its contrast inputs (``_contrast_inputs``) and a prototype bank already fed once."""
    parser = parser_for(demo_data, tmp_path, method=method, embed_dim=8, pixels_per_class=pixels_per_class)
    trainer = parser.get_parsed_content("train#trainer")
    hidden, _, targets, keeps = _contrast_inputs(trainer, seed=seed)
    bank = parser.get_parsed_content("train#prototype_bank")
    bank.update(torch.nn.functional.normalize(torch.randn(2, 8), dim=1), torch.ones(2, dtype=torch.bool))
    return trainer, bank, hidden, targets, keeps


def test_infonce_on_projected_sample_equals_the_whole_map_embeddings(demo_data, tmp_path):
    """L_img and its gradient are those of projecting the whole map and picking the sampled pixels."""
    from scripts.engines import gather_contrast_pixels
    from scripts.losses import prototype_infonce

    trainer, bank, hidden, targets, keeps = _contrast_trainer(demo_data, tmp_path, "mpamatch_img", 5, seed=2)
    head = trainer.network.projection_head
    losses = {}
    torch.manual_seed(0)
    trainer._contrast(hidden, targets, keeps, 2, losses)
    losses["loss_img"].backward()
    sparse_grad = head.layers[3].weight.grad.clone()
    head.zero_grad()
    torch.manual_seed(0)
    whole = [head.embed(h) for h in hidden]
    pixels, target, _ = gather_contrast_pixels(whole, targets, keeps, 2, 5)
    expected = prototype_infonce(pixels, target, bank.prototypes, trainer.image_temperature)
    expected.backward()
    assert float(losses["loss_img"]) > 0
    assert abs(float(losses["loss_img"]) - float(expected)) < 1e-5
    assert torch.allclose(sparse_grad, head.layers[3].weight.grad, atol=1e-6)


def test_contrastive_terms_run_in_float32_under_bf16_autocast(demo_data, tmp_path):
    trainer, _, hidden, targets, keeps = _contrast_trainer(demo_data, tmp_path, "mpamatch", 1000, seed=1)
    reference = {}
    torch.manual_seed(0)
    trainer._contrast(hidden, targets, keeps, 2, reference)
    under_autocast = {}
    torch.manual_seed(0)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        total = trainer._contrast(hidden, targets, keeps, 2, under_autocast)
    assert total.dtype == torch.float32
    for key in ("loss_img", "loss_txt"):
        assert float(reference[key].detach()) > 0
        assert abs(float(reference[key].detach()) - float(under_autocast[key].detach())) < 1e-5, key


def test_labeled_stream_is_oversampled_to_the_unlabeled_length(demo_data, tmp_path):
    from scripts.engines import RepeatedSampler

    parser = parser_for(demo_data, tmp_path, method="unimatch", num_epochs=1, labeled_batch_size=2,
                        unlabeled_batch_size=2)
    labeled = parser.get_parsed_content("train#labeled_dataloader")
    unlabeled = parser.get_parsed_content("train#unlabeled_dataloader")
    n_lab, n_unl = len(labeled.dataset), len(unlabeled.dataset)
    assert isinstance(labeled.sampler, RepeatedSampler) and labeled.drop_last
    assert len(labeled) == len(unlabeled) == n_unl // 2  # indices repeated to the unlabeled length
    labeled.sampler.set_epoch(5)
    drawn = list(labeled.sampler)
    assert len(drawn) == n_unl and set(drawn) == set(range(n_lab))
    trainer = parser.get_parsed_content("train#trainer")
    trainer.run()
    assert trainer.state.iteration == len(unlabeled)
    assert trainer._passes["labeled"] == 1  # one pass of the labeled loader covers the whole epoch


def test_repeated_sampler_draws_each_index_floor_or_ceil_times():
    from scripts.engines import RepeatedSampler

    sampler = RepeatedSampler(list(range(4)), length=10, seed=3)
    sampler.set_epoch(1)
    counts = torch.bincount(torch.tensor(list(sampler)), minlength=4)
    assert sorted(counts.tolist()) == [2, 2, 3, 3]
    with pytest.raises(ValueError, match="non-empty"):
        RepeatedSampler([], length=3)


@pytest.mark.parametrize("method", ["supervised", "unimatch"])
def test_iteration_budget_is_the_same_for_every_preset(method, demo_data, tmp_path):
    parser = parser_for(demo_data, tmp_path, method=method, num_iterations=5, epoch_iterations=2, val_interval=100)
    trainer = parser.get_parsed_content("train#trainer")
    scheduler = parser.get_parsed_content("lr_scheduler")
    assert (trainer.state.max_epochs, trainer.state.epoch_length) == (3, 2)  # 5 rounded up to whole epochs of 2
    assert scheduler.total_iters == 6
    trainer.run()
    assert trainer.state.iteration == 6


def test_training_schedule_refuses_bad_budgets():
    from scripts.engines import training_schedule
    from scripts.errors import ConfigError

    assert training_schedule(4, None, None, 7) == (4, 7)
    assert training_schedule(4, 100, 25, 7) == (4, 25)
    with pytest.raises(ConfigError, match="num_iterations=0"):
        training_schedule(4, 0, 25, 7)
    with pytest.raises(ConfigError, match="epoch_iterations"):
        training_schedule(4, 10, None, 0)


def test_repeated_sampler_never_leaves_an_image_out_and_favours_none():
    from scripts.engines import RepeatedSampler

    larger = RepeatedSampler(list(range(30)), length=20, seed=0)  # more labeled than unlabeled images
    assert sorted(larger) == list(range(30))
    sampler = RepeatedSampler(list(range(9)), length=68, seed=0)
    totals = torch.zeros(9)
    for epoch in range(40):
        sampler.set_epoch(epoch)
        drawn = torch.tensor(list(sampler))
        assert len(drawn) == 68 and set(torch.bincount(drawn, minlength=9).tolist()) <= {7, 8}
        totals += torch.bincount(drawn, minlength=9)
    # the images that get the eighth draw change from pass to pass
    assert totals.max() - totals.min() < 20


def test_labeled_and_unlabeled_streams_do_not_draw_in_lockstep(demo_data, tmp_path):
    parser = parser_for(demo_data, tmp_path, method="unimatch", labeled_batch_size=2, unlabeled_batch_size=2)
    trainer = parser.get_parsed_content("train#trainer")
    trainer.state.epoch = 1
    trainer._passes = {"unlabeled": 0, "labeled": 0, "mix": 0}
    orders = []
    for _ in range(4):
        trainer._streams.clear()
        trainer._next("labeled"), trainer._next("unlabeled")
        orders.append((list(trainer.labeled_loader.sampler), list(trainer.unlabeled_loader.sampler)))
    assert any(labeled != unlabeled for labeled, unlabeled in orders)


def test_float16_overflow_steps_the_scaler_and_is_not_divergence(demo_data, tmp_path):
    """An overflowing float16 gradient is skipped by the GradScaler, which lowers its scale; training goes on."""
    parser = parser_for(demo_data, tmp_path, method="unimatch", num_epochs=2, amp=True, amp_dtype="float16",
                        max_skipped_steps=1)
    trainer = parser.get_parsed_content("train#trainer")
    network = parser.get_parsed_content("network")
    weight = network.segmentation_head[0].weight if isinstance(network.segmentation_head, torch.nn.Sequential) \
        else next(network.segmentation_head.parameters())
    calls = {"n": 0}

    def overflow_first(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 1 else grad

    weight.register_hook(overflow_first)
    trainer.run()  # before the fix: "unscale_() has already been called on this optimizer" at the next step
    assert trainer.scaler is not None
    assert trainer.state.iteration == 4
    assert trainer.state.skipped_steps == 1 and trainer.state.consecutive_skips == 0  # not counted as divergence
    assert trainer.scaler.get_scale() < 2.0 ** 16  # lowered from its initial scale


def _mpamatch_step(demo_data, tmp_path, batches=None, text_reference=None):
    """One MPAMatch step at full contrast weight, from seeded weights, a fed prototype bank and the same batches:
    the step's losses, every trained parameter's gradient (before the update) and the batches drawn."""
    torch.manual_seed(0)
    parser = parser_for(demo_data, tmp_path, method="mpamatch")
    trainer = parser.get_parsed_content("train#trainer")
    trainer.prototype_bank.update(torch.nn.functional.normalize(torch.randn(2, TINY["embed_dim"]), dim=1),
                                  torch.ones(2, dtype=torch.bool))
    trainer.state.epoch = 1
    if batches is None:
        trainer._start_epoch(trainer)
        batches = {name: trainer._next(name) for name in ("labeled", "unlabeled", "mix")}
    trainer._next = lambda name: {k: v.clone() for k, v in batches[name].items()}
    if text_reference is not None:
        trainer.text_prototypes.raw_prototypes = lambda: text_reference(trainer.text_prototypes)
    trainer.state.iteration = trainer.state.max_epochs * trainer.state.epoch_length  # past the contrast warm-up
    torch.manual_seed(1)  # the same dropout and pixel samples
    losses = trainer._iteration(trainer, None)[0]
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    return losses, [p.grad for p in params], batches


def test_an_mpamatch_step_has_the_losses_and_gradients_of_the_text_tower_over_the_whole_context(demo_data, tmp_path):
    """The text tower runs over the prompt positions its end tokens see only: a whole training step keeps the losses
    and the gradient of every trained parameter that CLIP's tower over all 77 positions gives."""
    from tests.helpers import clip_prompt_features  # CLIP's tower from its definition, every position of the context

    losses, grads, batches = _mpamatch_step(demo_data, tmp_path)
    expected, expected_grads, _ = _mpamatch_step(demo_data, tmp_path, batches, text_reference=clip_prompt_features)
    assert set(losses) == set(expected) and losses["loss_txt"] > 0.1 and losses["loss_img"] > 0.1
    for key, value in expected.items():
        assert losses[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert len(grads) == len(expected_grads) > 50
    for grad, reference in zip(grads, expected_grads):
        assert (grad is None) == (reference is None)
        if reference is not None:
            torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()) + 1e-9)


def test_the_trainer_feeds_the_prototype_bank_without_any_handler(demo_data, tmp_path):
    """A config with no handlers at all still trains the image-prototype term (the bank is the trainer's duty)."""
    parser = parser_for(demo_data, tmp_path, method="mpamatch_img", num_epochs=1, contrast_warmup=0.0)
    parser["train#handlers"] = []
    trainer = parser.get_parsed_content("train#trainer")
    trainer.state.epoch_length = 2
    bank = parser.get_parsed_content("train#prototype_bank")
    trainer.run()
    assert bank.updates.tolist() == [2, 2]  # one update per class per counted step
    assert bank.ready and trainer.state.prototype_batch is None
    assert trainer.state.output[0]["loss_img"] > 0


def test_float16_scale_and_skip_counters_travel_in_the_trainer_state(demo_data, tmp_path):
    parser = parser_for(demo_data, tmp_path, method="supervised", num_epochs=1, amp=True, amp_dtype="float16")
    trainer = parser.get_parsed_content("train#trainer")
    trainer.scaler.scale(torch.ones(()))  # the scale exists once something was scaled
    trainer.scaler.update(1024.0)
    trainer.state.skipped_steps, trainer.state.consecutive_skips = 3, 1
    saved = torch.load(_saved(trainer.state_dict(), tmp_path), weights_only=True)

    fresh = parser_for(demo_data, tmp_path / "again", method="supervised", num_epochs=1, amp=True,
                       amp_dtype="float16").get_parsed_content("train#trainer")
    assert fresh.scaler.get_scale() == 2.0 ** 16
    fresh.load_state_dict(saved)
    assert fresh.scaler.get_scale() == 1024.0
    assert (fresh.state.skipped_steps, fresh.state.consecutive_skips) == (3, 1)
    fresh.load_state_dict({k: v for k, v in saved.items() if k not in ("grad_scaler", "skipped_steps")})  # older file
    assert fresh.state.skipped_steps == 0


def _saved(state, folder):
    path = folder / "trainer_state.pt"
    torch.save(state, path)
    return path


# ------------------------------------------------------------------------------------------- weight averaging
def _small_network():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))


def test_weight_average_follows_its_formula_and_copies_integer_buffers():
    live = _small_network()
    average = WeightAverage(live, decay=0.5)
    assert average.network is not live and not any(p.requires_grad for p in average.network.parameters())
    expected = {k: v.clone() for k, v in live.state_dict().items()}
    for step in range(4):
        with torch.no_grad():
            for p in live.parameters():
                p.add_(torch.randn_like(p))
            live[1].running_mean.add_(1.0)
            live[1].num_batches_tracked.add_(1)
        decay = min(0.5, step / (10 + step))  # 0 at the first update: it copies the live weights
        for key, value in live.state_dict().items():
            if value.is_floating_point():
                expected[key] = decay * expected[key] + (1 - decay) * value
            else:
                expected[key] = value.clone()
        average.update()
        for key, value in average.network.state_dict().items():
            torch.testing.assert_close(value, expected[key], msg=f"{key} after update {step}")
    assert average.network.state_dict()["1.num_batches_tracked"] == 4
    assert not torch.equal(average.network[0].weight, live[0].weight)


def test_weight_average_state_round_trips_and_is_off_at_decay_zero():
    live = _small_network()
    average = WeightAverage(live, decay=0.9)
    for _ in range(3):
        with torch.no_grad():
            live[0].weight.add_(1.0)
        average.update()
    restored = WeightAverage(_small_network(), decay=0.9)
    restored.load_state_dict(average.state_dict())
    assert restored.updates == 3 and torch.equal(restored.network[0].weight, average.network[0].weight)
    older = WeightAverage(live, decay=0.9)  # a checkpoint written without averaging starts it from the live weights
    older.load_state_dict({"decay": 0.0, "updates": 0})
    assert torch.equal(older.network[0].weight, live[0].weight)

    off = WeightAverage(live, decay=0.0)
    off.update()
    assert off.network is live and "network" not in off.state_dict()
    with pytest.raises(ConfigError, match="ema_decay=1.0 must be in"):
        WeightAverage(live, decay=1.0)


def test_validation_and_model_pt_use_the_averaged_weights(demo_data, tmp_path):
    parser = parser_for(demo_data, tmp_path, method="unimatch", num_epochs=1, ema_decay=0.8)
    trainer = parser.get_parsed_content("train#trainer")
    trainer.state.epoch_length = 3
    network = parser.get_parsed_content("network")
    snapshots = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda engine: snapshots.append({k: v.clone() for k, v in network.state_dict().items()}))
    trainer.run()
    average = parser.get_parsed_content("train#weight_average")
    assert parser.get_parsed_content("validate#evaluator").network is average.network
    assert average.updates == 3
    key = "segmentation_head.weight"
    expected = snapshots[0][key]
    for step, snapshot in enumerate(snapshots[1:], start=1):
        decay = min(0.8, step / (10 + step))
        expected = decay * expected + (1 - decay) * snapshot[key]
    torch.testing.assert_close(average.network.state_dict()[key], expected)
    assert not torch.equal(network.state_dict()[key], expected)
    saved = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)["model"]
    assert_same(saved, {k: v.cpu() for k, v in average.network.state_dict().items()}, "model.pt")


# ------------------------------------------------------------------------------------------------ torch.compile
def _compiled_trainer(demo_data, tmp_path, monkeypatch, method, compiled_call):
    """A 2-iteration trainer with ``compile: true``, torch.compile replaced by ``module -> compiled_call(module)``."""
    monkeypatch.setattr(torch, "compile", compiled_call)
    parser = parser_for(demo_data, tmp_path, method=method, num_epochs=1, compile=True)
    parser["train#handlers"] = []
    trainer = parser.get_parsed_content("train#trainer")
    trainer.state.epoch_length = 2
    return trainer, parser.get_parsed_content("network")


def test_compile_runs_the_training_forward_through_the_compiled_module(demo_data, tmp_path, monkeypatch):
    calls = []

    def recording(module):
        def compiled(images, **kwargs):
            calls.append(images.shape[0])
            return module(images, **kwargs)
        return compiled

    trainer, _ = _compiled_trainer(demo_data, tmp_path, monkeypatch, "unimatch", recording)
    trainer.run()
    assert len(calls) == 4  # weak (labeled + unlabeled) and strong passes of each of the 2 iterations
    assert trainer.state.output[0]["skipped"] == 0.0


def test_compile_that_fails_warns_and_trains_eagerly(demo_data, tmp_path, monkeypatch, caplog):
    def broken(module):
        def compiled(images, **kwargs):
            raise RuntimeError("backend compiler failed: no C++ compiler found")
        return compiled

    trainer, network = _compiled_trainer(demo_data, tmp_path, monkeypatch, "supervised", broken)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    with caplog.at_level("WARNING"):
        trainer.run()
    warnings = [r.getMessage() for r in caplog.records if "torch.compile cannot run" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0]
    assert any(not torch.equal(before[k], v) for k, v in network.state_dict().items())


def test_terminal_progress_bar_shows_iterations_and_loss_and_stays_off_when_disabled(capsys):
    from ignite.engine import Engine

    from scripts.handlers import TerminalProgressBar

    def step(engine, batch):
        return [{"loss": 0.25 * engine.state.iteration, "loss_x": 1.0}]

    engine = Engine(step)
    TerminalProgressBar(enabled="true", output_keys=["loss"]).attach(engine)
    engine.run(range(3), max_epochs=1)
    bar = capsys.readouterr().err
    # tqdm redraws in place and skips redraws closer than 0.1 s, so which counts appear depends on timing.
    assert re.search(r"Iteration: \[[123]/3\]", bar) and re.search(r"loss=0\.(25|5|75)", bar)
    assert "loss_x" not in bar

    quiet = Engine(step)
    TerminalProgressBar(enabled=False).attach(quiet)
    quiet.run(range(3), max_epochs=1)
    assert capsys.readouterr().err == ""
