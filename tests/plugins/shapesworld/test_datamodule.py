import torch

from tarkit.images import tensor_to_image
from tarkit.registry import registry
from tarkit_plugins.shapesworld.datamodule import ShapesWorldDataModule
from tarkit_plugins.shapesworld.oracle import answer_question, score_image
from tarkit_plugins.shapesworld.world import HELDOUT_COMBOS


def test_registered_and_batches_mix_all_tasks():
    assert registry.get("tarkit.datamodules", "shapesworld") is ShapesWorldDataModule
    data = ShapesWorldDataModule(train_size=64, val_size=8, batch_size=64)
    batch = next(iter(data.train_dataloader()))
    assert set(batch["task"]) == {"i2t", "t2i", "i2i", "ti2i"}
    for key in ("input_image", "target_image"):
        assert batch[key].shape == (64, 3, 64, 64) and batch[key].dtype == torch.float32
        assert 0.0 <= batch[key].min() and batch[key].max() <= 1.0
    for i, task in enumerate(batch["task"]):
        assert bool(batch["has_input_image"][i]) == (task != "t2i")
        assert bool(batch["has_target_image"][i]) == (task != "i2t")
        assert (batch["answer"][i] != "") == (task == "i2t")


def test_ratios_and_determinism():
    only_t2i = ShapesWorldDataModule(train_size=30, task_ratios={"t2i": 1.0}).train_set
    assert {only_t2i[i]["task"] for i in range(30)} == {"t2i"}
    a, b = ShapesWorldDataModule(seed=5).train_set, ShapesWorldDataModule(seed=5).train_set
    for i in range(5):
        assert a[i]["text"] == b[i]["text"] and torch.equal(a[i]["input_image"], b[i]["input_image"])


def test_samples_are_truthful():
    """t2i targets satisfy their prompt's GenEval spec; i2t yes/no answers are the oracle's."""
    data = ShapesWorldDataModule(train_size=40, task_ratios={"t2i": 1.0, "i2t": 1.0}, pope_fraction=1.0)
    dataset = data.train_set
    for i in range(40):
        sample = dataset[i]
        if sample["task"] == "t2i":
            record = dataset.sampler.example(i).record
            assert score_image(tensor_to_image(sample["target_image"]), record)[0]
        else:
            answer = answer_question(tensor_to_image(sample["input_image"]), sample["text"])
            assert sample["answer"] == f"{answer.capitalize()}."


def test_validation_uses_the_heldout_combinations():
    data = ShapesWorldDataModule(val_size=20)
    assert all(data.val_set.sampler.example(i).scene.combos() <= HELDOUT_COMBOS for i in range(20))


def test_each_epoch_shows_the_scenes_through_new_tasks():
    data = ShapesWorldDataModule(train_size=32, batch_size=32)
    loader = data.train_dataloader()
    first, second = (next(iter(loader)) for _ in range(2))
    assert sorted(first["task"]) != sorted(second["task"]) or first["text"] != second["text"]
    scene_images = ShapesWorldDataModule(train_size=32).train_set
    scene_images.set_epoch(3)
    assert scene_images.sampler.example(0) == data.train_set.sampler.example(0)  # scenes are fixed
