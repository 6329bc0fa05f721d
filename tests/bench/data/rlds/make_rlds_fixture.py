"""The test data of bench/rlds.py, written by TensorFlow Datasets itself (not a dependency of the
project: run it in an environment with tensorflow and tensorflow-datasets).

    python make_rlds_fixture.py OUT 32

writes OUT/libero_spatial_no_noops/1.0.0 (three short episodes in the layout of OpenVLA-OFT's
LIBERO RLDS datasets, 32x32 images), OUT/decoded_by_tf.npz (what TFDS reads back from it) and
OUT/jpeg_444_by_tf.npz (two real LIBERO frames encoded without chroma subsampling by
tf.image.encode_jpeg, and TensorFlow's decode of them; kept in tests/policies/vla/data).
"""
import os
import sys
import numpy as np
import tensorflow_datasets as tfds

SIZE = int(sys.argv[2]) if len(sys.argv) > 2 else 64
INSTR = ["pick up the black bowl between the plate and the ramekin and place it on the plate",
         "pick up the black bowl next to the ramekin and place it on the plate"]


class LiberoSpatialNoNoops(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        img = lambda: tfds.features.Image(shape=(SIZE, SIZE, 3), dtype=np.uint8, encoding_format="jpeg")
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "steps": tfds.features.Dataset({
                "observation": tfds.features.FeaturesDict({
                    "image": img(), "wrist_image": img(),
                    "state": tfds.features.Tensor(shape=(8,), dtype=np.float32),
                    "joint_state": tfds.features.Tensor(shape=(7,), dtype=np.float32),
                }),
                "action": tfds.features.Tensor(shape=(7,), dtype=np.float32),
                "discount": tfds.features.Scalar(dtype=np.float32),
                "reward": tfds.features.Scalar(dtype=np.float32),
                "is_first": tfds.features.Scalar(dtype=np.bool_),
                "is_last": tfds.features.Scalar(dtype=np.bool_),
                "is_terminal": tfds.features.Scalar(dtype=np.bool_),
                "language_instruction": tfds.features.Text(),
            }),
            "episode_metadata": tfds.features.FeaturesDict({"file_path": tfds.features.Text()}),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:SIZE, 0:SIZE]
        for e, length in enumerate([9, 11, 10]):
            steps = []
            for t in range(length):
                base = np.stack([(xx * 3 + t * 20) % 256, (yy * 2 + e * 50) % 256, (xx + yy) % 256], -1)
                steps.append({
                    "observation": {
                        "image": base.astype(np.uint8),
                        "wrist_image": (255 - base).astype(np.uint8),
                        "state": rng.normal(size=8).astype(np.float32),
                        "joint_state": rng.normal(size=7).astype(np.float32),
                    },
                    "action": np.concatenate([rng.uniform(-1, 1, 6), [1.0 if t > 2 else -1.0]]).astype(np.float32),
                    "discount": 1.0, "reward": float(t == length - 1),
                    "is_first": t == 0, "is_last": t == length - 1, "is_terminal": t == length - 1,
                    "language_instruction": INSTR[e % 2],
                })
            yield f"episode_{e}", {"steps": steps, "episode_metadata": {"file_path": f"/data/libero_spatial/task_{e % 2}_demo.hdf5"}}


builder = LiberoSpatialNoNoops(data_dir=sys.argv[1], file_format="tfrecord")
builder.download_and_prepare()
ds = builder.as_dataset(split="train")
out = {}
for i, ep in enumerate(ds):
    steps = list(ep["steps"])
    out[f"ep{i}_image"] = np.stack([s["observation"]["image"].numpy() for s in steps])
    out[f"ep{i}_wrist"] = np.stack([s["observation"]["wrist_image"].numpy() for s in steps])
    out[f"ep{i}_state"] = np.stack([s["observation"]["state"].numpy() for s in steps])
    out[f"ep{i}_action"] = np.stack([s["action"].numpy() for s in steps])
    out[f"ep{i}_instr"] = np.array([steps[0]["language_instruction"].numpy().decode()])
    out[f"ep{i}_path"] = np.array([ep["episode_metadata"]["file_path"].numpy().decode()])
np.savez_compressed(sys.argv[1] + "/decoded_by_tf.npz", **out)
print("episodes", len(list(ds)))

import tensorflow as tf  # noqa: E402

frames = np.load(os.path.join(os.path.dirname(__file__), "../../../policies/vla/data/tf_preprocess_reference.npz"))
out = {}
for name in ("frame0", "frame1"):
    data = tf.image.encode_jpeg(frames[name], quality=95, chroma_downsampling=False).numpy()
    out[name + "_444_jpeg"] = np.frombuffer(data, np.uint8)
    out[name + "_444_tf"] = tf.io.decode_image(data).numpy()
np.savez_compressed(sys.argv[1] + "/jpeg_444_by_tf.npz", **out)
