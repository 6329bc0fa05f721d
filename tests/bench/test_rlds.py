"""OpenVLA-OFT's LIBERO RLDS datasets without TensorFlow, against a dataset TensorFlow Datasets wrote
(tests/bench/data/rlds/make_rlds_fixture.py) and what it read back."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from bench.cli import main
from bench.demos import read_demos
from bench.rlds import import_rlds, masked_crc32c, read_episodes
from bench.training_data import TrainingSet
from policies.vla.preprocess import decode_jpeg
from suites import get_suite

DATA = Path(__file__).parent / "data" / "rlds"
DATASET = DATA / "libero_spatial_no_noops" / "1.0.0"
SHARD = "libero_spatial_no_noops-train.tfrecord-00000-of-00001"


@pytest.fixture(scope="module")
def by_tensorflow():
    return np.load(DATA / "decoded_by_tf.npz")


def test_episodes_read_as_tensorflow_reads_them(by_tensorflow):
    episodes = list(read_episodes(DATASET))
    assert [len(e.actions) for e in episodes] == [len(by_tensorflow[f"ep{i}_action"]) for i in range(3)]
    for i, episode in enumerate(episodes):
        assert np.array_equal(episode.actions, by_tensorflow[f"ep{i}_action"])
        assert np.array_equal(episode.states, by_tensorflow[f"ep{i}_state"])
        assert np.array_equal(np.stack([decode_jpeg(b) for b in episode.images]), by_tensorflow[f"ep{i}_image"])
        assert np.array_equal(np.stack([decode_jpeg(b) for b in episode.wrist_images]), by_tensorflow[f"ep{i}_wrist"])
        assert episode.instruction == by_tensorflow[f"ep{i}_instr"][0]
        assert episode.file_path == by_tensorflow[f"ep{i}_path"][0]
        assert episode.rewards[-1] == 1 and episode.rewards[:-1].sum() == 0


def test_tfrecord_checksums_and_damage(tmp_path):
    assert masked_crc32c(b"") == 0xA282EAD8  # CRC-32C of nothing is 0: only the mask's offset
    crc = 0xE3069283  # CRC-32C's check value, of b"123456789"
    assert masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    damaged = tmp_path / "damaged"
    shutil.copytree(DATASET, damaged)
    shard = damaged / SHARD
    data = bytearray(shard.read_bytes())
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(ValueError, match="truncated"):
        list(read_episodes(damaged))
    length = int.from_bytes(data[:8], "little")
    flipped = bytearray(data)
    flipped[12 + length // 2] ^= 0x01  # one bit inside the first record's data
    shard.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="damaged: record 0's data fails its checksum"):
        list(read_episodes(damaged))
    data[3] ^= 0xFF  # the first record's length
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="record 0's length fails its checksum"):
        list(read_episodes(damaged))
    with pytest.raises(FileNotFoundError, match="no dataset_info.json"):
        list(read_episodes(DATASET.parent))


def test_import_writes_a_training_file_with_the_images_tensorflow_decodes(tmp_path, by_tensorflow):
    out = tmp_path / "spatial.hdf5"
    summary = import_rlds(DATASET, out, progress=False)
    assert (summary.episodes, summary.steps) == (3, 30)
    demos = read_demos(out)
    spatial = get_suite("libero_spatial")
    for i, demo in enumerate(demos):
        assert np.array_equal(demo.actions, by_tensorflow[f"ep{i}_action"].astype(np.float64))
        assert np.array_equal(demo.obs["agentview_rgb"], by_tensorflow[f"ep{i}_image"])
        assert np.array_equal(demo.obs["eye_in_hand_rgb"], by_tensorflow[f"ep{i}_wrist"])
        state = by_tensorflow[f"ep{i}_state"]
        proprio = np.concatenate([demo.obs[k] for k in ("ee_pos", "ee_ori", "gripper_states")], axis=1)
        assert np.array_equal(proprio, state)
        task = spatial.task(int(demo.attrs["task_index"]))
        assert task.instruction == demo.attrs["instruction"] == by_tensorflow[f"ep{i}_instr"][0]
        assert demo.attrs["source_file"] == by_tensorflow[f"ep{i}_path"][0]
    data = TrainingSet([out], chunk_length=4)
    try:
        sample = data.sample(0)
        assert sample["from_jpeg"] is True  # resized as OFT's pipeline does, without a JPEG round trip
        assert data.dropped_noops == 0 and data.suites == ["libero_spatial"]
    finally:
        data.close()


def test_import_refuses_by_name_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out.hdf5"
    with pytest.raises(ValueError, match="is no task of libero_object; give the dataset's suite with --suite"):
        import_rlds(DATASET, out, "libero_object", progress=False)
    assert list(tmp_path.iterdir()) == []
    renamed = tmp_path / "mine"
    renamed.mkdir()
    (renamed / "dataset_info.json").write_text((DATASET / "dataset_info.json").read_text()
                                               .replace("libero_spatial_no_noops", "my_robot_data"))
    shutil.copy(DATASET / SHARD, renamed / SHARD.replace("libero_spatial_no_noops", "my_robot_data"))
    with pytest.raises(ValueError, match="dataset my_robot_data: its name does not say its suite"):
        import_rlds(renamed, out, progress=False)
    assert import_rlds(renamed, out, "libero_spatial", progress=False).episodes == 3
    with pytest.raises(FileExistsError, match="already exists"):
        import_rlds(DATASET, out, progress=False)


def test_the_cli_imports_and_fine_tuning_trains_on_it(tmp_path, capsys):
    out = tmp_path / "spatial.hdf5"
    assert main(["import-rlds", "--source", str(DATASET), "--out", str(out), "--no-progress"]) == 0
    assert "3 episodes, 30 steps of libero_spatial_no_noops" in capsys.readouterr().out
    assert main(["finetune", "--demos", str(out), "--out", str(tmp_path / "ft"), "--steps", "2", "--batch-size", "2",
                 "--lora-rank", "2", "--device", "cpu", "--policy-arg", "size=tiny", "--no-progress"]) == 0
    assert (tmp_path / "ft" / "checkpoint" / "dataset_statistics.json").is_file()


def test_the_trainer_resizes_imported_images_without_a_jpeg_round_trip(tmp_path):
    from bench.finetune import FinetuneConfig, Trainer
    from policies.vla.preprocess import lanczos_resize, pixel_values

    out = tmp_path / "spatial.hdf5"
    import_rlds(DATASET, out, progress=False)
    trainer = Trainer(FinetuneConfig(demos=[str(out)], batch_size=2, lora_rank=2, policy_args={"device": "cpu", "size": "tiny"}),
                      tmp_path / "ft")
    try:
        pixels = trainer.tensors(trainer.data, [0], None, crop=False)[0][0].numpy()
        images = trainer.data.sample(0)["images"]
        cfg = trainer.model.config
        expected = pixel_values([lanczos_resize(image, cfg.image_sizes[0]) for image in images], cfg.image_means,
                                cfg.image_stds)
        assert np.array_equal(pixels, expected)
    finally:
        trainer.close()
