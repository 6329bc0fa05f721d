"""OpenVLA-OFT's LIBERO datasets (RLDS, as TensorFlow Datasets writes them), read without TensorFlow.

A dataset directory (``libero_spatial_no_noops/1.0.0``) holds ``dataset_info.json`` and the
TFRecord shards ``<name>-train.tfrecord-<i>-of-<n>``. A record is one episode: a serialised
``tf.train.Example`` whose features hold the steps' values flattened per key
(``steps/action``: T x 7 floats, ``steps/observation/image``: T JPEG files, booleans as
int64, text as bytes). OFT's LIBERO datasets hold the regenerated demonstrations (no-ops
removed, 256x256 images rotated upright, JPEG-encoded), the 8-D proprio state (end-effector
position, axis-angle, gripper fingers), the joint positions and the environment's actions.

``import_rlds`` writes them as a demonstration file in ``bench record-demos``' layout, with
the images decoded as TensorFlow decodes them; ``bench finetune`` then trains on the same
pixels OFT's pipeline does (a file marked ``image_source = "jpeg"`` skips the JPEG round trip
that images rendered by the simulator get). Every record's checksums (of its length and of its
data) are checked, so a damaged download is refused by name.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

STEP_KEYS = {"action": "steps/action", "state": "steps/observation/state",
             "joint_state": "steps/observation/joint_state", "image": "steps/observation/image",
             "wrist_image": "steps/observation/wrist_image", "instruction": "steps/language_instruction",
             "reward": "steps/reward"}


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C (in C: an episode's record holds megabytes), rotated and offset."""
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecords(path: Path) -> Iterator[bytes]:
    """The records of a TFRecord file: each a little-endian uint64 length with its checksum, the
    data and the data's checksum."""
    with open(path, "rb") as f:
        index = 0
        while header := f.read(12):
            length_bytes = header[:8]
            if len(header) < 12 or masked_crc32c(length_bytes) != struct.unpack("<I", header[8:])[0]:
                raise ValueError(f"{path} is not a TFRecord file, or it is damaged (record {index}'s length fails "
                                 "its checksum)")
            (length,) = struct.unpack("<Q", length_bytes)
            data, footer = f.read(length), f.read(4)
            if len(data) < length or len(footer) < 4:
                raise ValueError(f"{path} ends inside a record: the file is truncated")
            if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
                raise ValueError(f"{path} is damaged: record {index}'s data fails its checksum")
            yield data
            index += 1


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, object]]:
    """A protocol buffer message's (field number, wire type, value): an int, or a memoryview for
    length-delimited values."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protocol buffer wire type {wire}")
        yield number, wire, value


def _feature(message: memoryview) -> list[bytes] | np.ndarray:
    """A tf.train.Feature: bytes_list (1), float_list (2) or int64_list (3)."""
    for kind, _, values in _fields(message):
        items = list(_fields(values))
        if kind == 1:
            return [bytes(v) for number, _, v in items if number == 1]
        if kind == 2:  # packed (one length-delimited run) or one fixed32 per value
            raw = b"".join(bytes(v) for number, _, v in items if number == 1)
            return np.frombuffer(raw, "<f4").copy()
        if kind == 3:
            out: list[int] = []
            for number, wire, v in items:
                if number != 1:
                    continue
                if wire == 0:
                    out.append(v)
                else:
                    pos = 0
                    while pos < len(v):
                        value, pos = _varint(v, pos)
                        out.append(value)
            return np.array([x - (1 << 64) if x >= 1 << 63 else x for x in out], dtype=np.int64)
    return []


def parse_example(data: bytes) -> dict[str, list[bytes] | np.ndarray]:
    """A serialised tf.train.Example -> {feature name: its values}."""
    features: dict[str, list[bytes] | np.ndarray] = {}
    for number, _, message in _fields(memoryview(data)):
        if number != 1:  # Example.features
            continue
        for entry_number, _, entry in _fields(message):  # Features.feature: map entries
            if entry_number != 1:
                continue
            key, value = None, memoryview(b"")
            for part, _, v in _fields(entry):
                if part == 1:
                    key = bytes(v).decode()
                elif part == 2:
                    value = v
            features[key] = _feature(value)
    return features


@dataclass
class RldsEpisode:
    actions: np.ndarray  # (T, 7) float32, the environment's
    states: np.ndarray  # (T, 8): end-effector position, axis-angle, gripper fingers
    joint_states: np.ndarray  # (T, 7)
    images: list[bytes]  # JPEG files, third-person camera
    wrist_images: list[bytes]
    rewards: np.ndarray
    instruction: str
    file_path: str  # the demonstration file it was made from (episode_metadata/file_path)


def episode_from_example(features: dict) -> RldsEpisode:
    missing = [key for key in STEP_KEYS.values() if key not in features]
    if missing:
        raise ValueError(f"the episode lacks {', '.join(missing)}: not a LIBERO dataset of OpenVLA-OFT's layout")
    steps = len(features[STEP_KEYS["image"]])

    def per_step(key, width):
        values = np.asarray(features[STEP_KEYS[key]], dtype=np.float32)
        if values.size != steps * width:
            raise ValueError(f"{STEP_KEYS[key]} holds {values.size} values for {steps} steps of {width}")
        return values.reshape(steps, width)

    instructions = features[STEP_KEYS["instruction"]]
    path = features.get("episode_metadata/file_path", [b""])
    return RldsEpisode(per_step("action", 7), per_step("state", 8), per_step("joint_state", 7),
                       list(features[STEP_KEYS["image"]]), list(features[STEP_KEYS["wrist_image"]]),
                       per_step("reward", 1)[:, 0], instructions[0].decode() if instructions else "",
                       path[0].decode() if path else "")


def dataset_shards(directory: Path) -> tuple[str, list[Path]]:
    """The dataset's name and its train split's shards, in order."""
    directory = Path(directory)
    info_path = directory / "dataset_info.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{directory} is not an RLDS dataset directory: it has no dataset_info.json "
                                "(give the version directory, e.g. libero_spatial_no_noops/1.0.0)")
    name = json.loads(info_path.read_text())["name"]
    shards = sorted(directory.glob(f"{name}-train.tfrecord-*"))
    if not shards:
        raise ValueError(f"{directory} holds no shards of {name}'s train split ({name}-train.tfrecord-*)")
    return name, shards


def read_episodes(directory: Path) -> Iterator[RldsEpisode]:
    for shard in dataset_shards(directory)[1]:
        for record in tfrecords(shard):
            yield episode_from_example(parse_example(record))


@dataclass
class ImportSummary:
    path: Path
    dataset: str
    episodes: int
    steps: int


def import_rlds(source: Path, out: Path, suite_name: str | None = None, progress: bool = True) -> ImportSummary:
    """Write the dataset in ``source`` as a demonstration file (``bench record-demos``' layout).
    The file is written aside and put in place when complete."""
    import os

    from tqdm import tqdm

    from bench.demos import IMAGE_ORIENTATION, JPEG_IMAGE_SOURCE, DemoWriter
    from bench.provenance import now_iso, package_versions
    from policies.vla.preprocess import decode_jpeg
    from suites import get_suite

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another --out or remove it first")
    name, shards = dataset_shards(source)
    try:
        suite = get_suite(suite_name or name.removesuffix("_no_noops"))  # OFT's names: <suite>_no_noops
    except ValueError:
        if suite_name:
            raise
        raise ValueError(f"dataset {name}: its name does not say its suite; give it with --suite") from None
    partial = out.with_name(out.name + ".partial")
    partial.unlink(missing_ok=True)  # what an interrupted import left
    writer = DemoWriter(partial, {
        "suite": suite.name,
        "policy": f"RLDS dataset {name}",
        "image_orientation": IMAGE_ORIENTATION,  # OFT rotated its LIBERO images upright
        "image_source": JPEG_IMAGE_SOURCE,
        "sources": json.dumps([shard.name for shard in shards]),
        "versions": str(package_versions()),
        "created_at": now_iso(),
    })
    total_steps, complete = 0, False
    try:
        for episode in tqdm(read_episodes(source), unit="episode", disable=not progress):
            task = suite.task_with_instruction(episode.instruction)
            if task is None:
                raise ValueError(f"an episode's instruction {episode.instruction!r} is no task of {suite.name}; "
                                 "give the dataset's suite with --suite")
            steps = [{
                "action": action.astype(np.float64), "state": np.zeros(0), "reward": float(reward),
                "agentview_rgb": decode_jpeg(image), "eye_in_hand_rgb": decode_jpeg(wrist),
                "ee_pos": state[:3], "ee_ori": state[3:6], "gripper_states": state[6:8], "joint_states": joints,
            } for action, reward, image, wrist, state, joints in zip(
                episode.actions, episode.rewards, episode.images, episode.wrist_images, episode.states,
                episode.joint_states)]
            writer.add(steps, {"suite": suite.name, "task_index": task.index, "task_name": task.name,
                               "instruction": task.instruction, "source_file": episode.file_path})
            if total_steps == 0:
                writer.set_file_attr("image_size", steps[0]["agentview_rgb"].shape[0])
            total_steps += len(steps)
        complete = True
    finally:
        writer.close()
        if complete:
            os.replace(partial, out)
        else:
            partial.unlink(missing_ok=True)
    return ImportSummary(out, name, writer.count, total_steps)
