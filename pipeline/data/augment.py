"""Training-time image augmentation (phase 3, finetune mode): seeded per item, so a resumed run
sees the same crops it would have seen uninterrupted."""
from __future__ import annotations


def augment_image(image, image_size: int, seed):
    """Random resized crop, horizontal flip, mild brightness/contrast/saturation jitter; float32 0..255 out.

    Stateless ops with an explicit per-item seed: the same item index always gets the same augmentation.
    """
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(seed, num=5)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seeds[0],
        min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.5, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, size)
    image = tf.image.resize(tf.cast(image, tf.float32), (image_size, image_size), method="bilinear", antialias=True)
    image = tf.image.stateless_random_flip_left_right(image, seeds[1])
    # Colour ops expect 0..1; the jitter is mild because colour is often what tells classes apart.
    image = image / 255.0
    image = tf.image.stateless_random_brightness(image, 0.1, seeds[2])
    image = tf.image.stateless_random_contrast(image, 0.9, 1.1, seeds[3])
    image = tf.image.stateless_random_saturation(image, 0.9, 1.1, seeds[4])
    return tf.clip_by_value(image, 0.0, 1.0) * 255.0
