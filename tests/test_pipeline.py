import numpy as np
import tensorflow as tf

from experiments.data import folder_dataset, load_image


def _write_jpegs(folder, sizes):
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(sizes):
        (folder / f"c{i % 2}").mkdir(exist_ok=True)
        path = str(folder / f"c{i % 2}" / f"{i}.jpg")
        tf.io.write_file(path, tf.io.encode_jpeg(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
        paths.append(path)
    return paths


def test_load_image_skips_resize_at_target_size_and_resizes_otherwise(tmp_path):
    same, other = _write_jpegs(tmp_path, [(16, 16), (20, 12)])
    decoded = tf.io.decode_jpeg(tf.io.read_file(same), channels=3).numpy().astype("float32")
    np.testing.assert_array_equal(load_image(same, 16).numpy(), decoded)
    img = load_image(other, 16).numpy()
    assert img.shape == (16, 16, 3) and img.dtype == np.float32 and 0 <= img.min() <= img.max() <= 255


def test_folder_dataset_batches_match_decoded_images(tmp_path):
    paths = _write_jpegs(tmp_path, [(16, 16)] * 5)
    labels = np.arange(5) % 2
    ds = folder_dataset(paths, labels, 16, batch_size=2, preprocess=lambda x: x / 255.0)
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    np.testing.assert_array_equal(np.concatenate(ys), labels)
    expected = np.stack([load_image(p, 16).numpy() for p in paths]) / 255.0
    np.testing.assert_allclose(np.concatenate(xs), expected, rtol=1e-6)
