"""SavedModels a bundle serves: encoded image bytes (or pixels, or texts) in → unit embedding out.

The image SavedModel (`keras.export.ExportArchive`) has two endpoints:
    embed_image_bytes   string [batch] encoded JPEG/PNG/GIF/BMP → {"embedding": float32 [batch, dim]}; the
                        first endpoint, so also `serving_default` (TF Serving, or `tf.saved_model.load` without
                        embedlab). Decoding and resizing run in the graph with `decode_and_resize`, THE decode of
                        phase 1, so a collection image's bytes give back its stored embedding.
    embed_pixels        float32 [batch, S, S, 3], RGB in 0..255 (preprocessing inside) → {"embedding": ...}
The text SavedModel (CLIP backbones) has
    embed_token_ids     int32 [batch, 77], CLIP-packed token ids → {"embedding": ...} (`serving_default`)
    embed_texts         string [batch] → {"embedding": ..., "token_ids": ...}: tokenised in the graph. keras-hub's
                        CLIPTokenizer inside a graph skips what its Python path does first (Unicode NFC, lower
                        case, whitespace collapsed, every digit its own word); `clip_text_normaliser` does it in
                        the graph, and `served_text_error` checks the ids against `CLIPTextEmbedder.tokenize`.
                        Its regex ops are tensorflow-text's: a reader imports `tensorflow_text` before loading
                        (TF Serving ships them).
`served_image_error` / `served_text_error` reload a written SavedModel with plain `tf.saved_model.load`, as a
deployment would, and measure it against embeddings computed in the project.

`write_image_onnx` also converts the image model (pixels in, as `embed_pixels`) to ONNX with tf2onnx, for a faster
single-image path under ONNX Runtime (bench 9: 79 ms vs 160-200 ms per CLIP image on 2 cores). Decoding stays in
TensorFlow (`decode_and_resize`, the same op as the SavedModel's), so only the network changes runtime; the file
is kept only when ONNX Runtime reproduces the SavedModel's embeddings of the probe images to `ONNX_TOLERANCE`.
tf2onnx / onnxruntime are optional (the `onnx` extra): without them there is no ONNX file and serving uses the
SavedModel.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

IMAGE_ENDPOINTS = ("embed_image_bytes", "embed_pixels")
TEXT_ENDPOINTS = ("embed_token_ids", "embed_texts")
ONNX_INPUT, ONNX_OUTPUT, ONNX_OPSET = "pixels", "embedding", 17
ONNX_TOLERANCE = 1e-4
# ONNX Runtime's intra-op threads: on 2 shared cores a single MobileNet-0.25 224-px query (decode included) took
# a median 6.5 ms with 2 threads vs 7.5 ms with 1 (SavedModel 10-12 ms); on a tiny model the two are equal.
ONNX_THREADS = 2

log = logging.getLogger("embedlab.serving")


def embedding_output(model):
    """A single-output Keras model (images → unit embedding) from a phase-1 extractor's {"pooled", "embedding"}
    model, or the model itself when it already has one output (phase 3's `embedding_model.keras`)."""
    import keras

    output = model.output
    if isinstance(output, dict):
        return keras.Model(model.input, output["embedding"], name=f"{model.name}_embedding")
    return model


def model_image_size(model) -> int:
    shape = model.inputs[0].shape
    if len(shape) != 4 or shape[1] is None or shape[1] != shape[2] or shape[3] != 3:
        raise ValueError(f"model {model.name!r} takes {tuple(shape)}, not square RGB images")
    return int(shape[1])


def model_input_sizes(model) -> list[int]:
    """The square size of every pixel input of an image model: one for a single model, one per distinct member
    size (ascending) for an ensemble (models/ensemble.py `build_ensemble_model`)."""
    sizes = []
    for tensor in model.inputs:
        shape = tensor.shape
        if len(shape) != 4 or shape[1] is None or shape[1] != shape[2] or shape[3] != 3:
            raise ValueError(f"model {model.name!r} takes {tuple(shape)}, not square RGB images")
        sizes.append(int(shape[1]))
    return sizes


def write_image_saved_model(model, destination: str | Path) -> int:
    """Write the image SavedModel of a single-output image model to `destination`; returns the image size (the
    largest, for an ensemble whose members read several sizes)."""
    import keras
    import tensorflow as tf

    sizes = model_input_sizes(model)
    size = max(sizes)

    def run(pixels_per_size):
        inputs = pixels_per_size if len(sizes) > 1 else pixels_per_size[0]
        return {"embedding": tf.cast(model(inputs, training=False), tf.float32)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def embed_image_bytes(images):
        # Decoded once per size, straight from the bytes, as phase 1 decoded them for each member (the ONNX
        # path decodes with this same function).
        return run([decode_batch(images, s) for s in sizes])

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="pixels")])
    def embed_pixels(pixels):
        # An ensemble's smaller members get the pixels resized in the graph: close to, not exactly, what
        # embed_image_bytes gives (which resizes the original image once).
        return run([pixels if s == size else tf.image.resize(pixels, (s, s), antialias=True) for s in sizes])

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(IMAGE_ENDPOINTS[0], embed_image_bytes)   # the first endpoint becomes serving_default
    archive.add_endpoint(IMAGE_ENDPOINTS[1], embed_pixels)
    archive.write_out(str(destination), verbose=False)
    return size


def clip_text_normaliser(texts):
    """In the graph, what keras-hub's Python CLIP tokenizer does before its regex split: NFC, lower case,
    whitespace runs → one space, and a space around every digit (its regex takes digits one at a time, the
    graph path's GPT-2 regex takes runs of them)."""
    import tensorflow as tf
    import tensorflow_text as tf_text

    texts = tf_text.normalize_utf8(texts, "NFC")
    texts = tf.strings.lower(texts, encoding="utf-8")
    texts = tf.strings.regex_replace(texts, r"\s+", " ")
    return tf.strings.regex_replace(texts, r"(\pN)", r" \1 ")


def write_text_saved_model(embedder, destination: str | Path) -> None:
    """The text SavedModel of a `CLIPTextEmbedder` (models/backbones/clip_text.py): ids and texts in."""
    import keras
    import tensorflow as tf

    from models.backbones.clip_text import SEQUENCE_LENGTH

    tokenizer, text_model = embedder.tokenizer, embedder.model
    start, end = int(tokenizer.start_token_id), int(tokenizer.end_token_id)

    @tf.function(input_signature=[tf.TensorSpec([None, SEQUENCE_LENGTH], tf.int32, name="token_ids")])
    def embed_token_ids(token_ids):
        return {"embedding": tf.cast(text_model(token_ids)["embedding"], tf.float32)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="texts")])
    def embed_texts(texts):
        pieces = tf.cast(tokenizer(clip_text_normaliser(texts)), tf.int32)[:, :SEQUENCE_LENGTH - 2]
        n = tf.shape(texts)[0]
        packed = tf.concat([tf.fill([n, 1], start), pieces, tf.fill([n, 1], end)], axis=1)
        # Padding with the end token, as CLIPTextEmbedder.tokenize does (the encoder is causal: it changes nothing).
        token_ids = packed.to_tensor(default_value=end, shape=[None, SEQUENCE_LENGTH])
        return {"embedding": tf.cast(text_model(token_ids)["embedding"], tf.float32), "token_ids": token_ids}

    if not tokenizer.built:
        tokenizer(["x"])   # a Keras layer must have run once before it is exported
    archive = keras.export.ExportArchive()
    archive.track(text_model)
    archive.track(tokenizer)
    archive.add_endpoint(TEXT_ENDPOINTS[0], embed_token_ids)
    archive.add_endpoint(TEXT_ENDPOINTS[1], embed_texts)
    archive.write_out(str(destination), verbose=False)


def load_saved_model(folder: str | Path, text: bool = False):
    """`tf.saved_model.load` of a bundle's model folder; keep the returned object alive while calling it
    (it owns the variables). A text model needs tensorflow-text's ops registered first."""
    import tensorflow as tf

    if text:
        import tensorflow_text  # noqa: F401  (registers the regex ops of embed_texts)
    return tf.saved_model.load(str(folder))


def served_image_error(folder: str | Path, encoded: Sequence[bytes], expected: np.ndarray) -> float:
    """Largest |served − expected| over the embeddings the reloaded image SavedModel gives for `encoded`,
    through `serving_default` (what TF Serving calls) and checked equal to `embed_image_bytes`."""
    import tensorflow as tf

    loaded = load_saved_model(folder)
    images = tf.constant(list(encoded), dtype=tf.string)
    served = loaded.signatures["serving_default"](images=images)["embedding"].numpy()
    direct = loaded.embed_image_bytes(images)["embedding"].numpy()
    return float(max(np.max(np.abs(served - expected)), np.max(np.abs(direct - expected))))


def served_text_error(folder: str | Path, embedder, texts: Sequence[str]) -> dict:
    """The text SavedModel in `folder`, reloaded, against the Python tokenizer and the Keras text model."""
    return text_model_error(load_saved_model(folder, text=True), embedder, texts)


def text_model_error(loaded, embedder, texts: Sequence[str]) -> dict:
    """A loaded text SavedModel against `embedder` (CLIPTextEmbedder) on `texts`: {"ids_equal": every token id
    of embed_texts the Python tokenizer's, "max_abs_diff": of the embeddings (ids and texts endpoints)}."""
    import tensorflow as tf

    ids, _ = embedder.tokenize(list(texts))
    expected = embedder.embed(list(texts)).embedding
    from_texts = loaded.embed_texts(tf.constant(list(texts), dtype=tf.string))
    from_ids = loaded.embed_token_ids(tf.constant(ids, dtype=tf.int32))["embedding"].numpy()
    diff = max(np.max(np.abs(from_ids - expected)), np.max(np.abs(from_texts["embedding"].numpy() - expected)))
    return {"ids_equal": bool(np.array_equal(from_texts["token_ids"].numpy(), ids)), "max_abs_diff": float(diff)}


def onnx_missing() -> str | None:
    """Why the ONNX path cannot be used here (tf2onnx / onnxruntime not importable), or None."""
    try:
        import onnxruntime  # noqa: F401
        import tf2onnx  # noqa: F401
    except ImportError as exc:
        return f"{exc} (install the `onnx` extra)"
    return None


def onnx_session(path: str | Path, threads: int = ONNX_THREADS):
    """An ONNX Runtime CPU session over `path`."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def decode_batch(images, size: int):
    """Encoded images (string tensor [batch]) → float32 [batch, size, size, 3] pixels, exactly as the image
    SavedModel's `embed_image_bytes` decodes them (`decode_and_resize`)."""
    import tensorflow as tf

    from pipeline.data.tfrecords import decode_and_resize

    return tf.map_fn(lambda encoded: decode_and_resize(encoded, size), images,
                     fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))


def write_image_onnx(model, destination: str | Path, saved_model_dir: str | Path, encoded: Sequence[bytes]) -> dict:
    """Convert a single-output image model (pixels in 0..255 → unit embedding) to ONNX at `destination` and
    check it before keeping it: ONNX Runtime on `encoded` (decoded as the SavedModel decodes them) must give the
    image SavedModel's embeddings in `saved_model_dir` to `ONNX_TOLERANCE`. Never raises for a conversion or
    check that fails: the file is then absent and the returned record says why (logged) — the SavedModel
    serves alone. Returns {"written", "max_abs_diff", "tolerance", "images", "opset", "reason"}."""
    from pipeline.core import atomic

    destination = Path(destination)
    record = {"written": False, "max_abs_diff": None, "tolerance": ONNX_TOLERANCE, "images": len(encoded),
              "opset": ONNX_OPSET, "reason": onnx_missing()}
    if record["reason"] is None and not len(encoded):
        record["reason"] = "no probe images to check it on"
    if record["reason"] is None and len(model.inputs) > 1:
        record["reason"] = "an ensemble whose members read several image sizes has no single pixel input"
    if record["reason"] is not None:
        log.warning("no %s: %s", destination.name, record["reason"])
        return record
    import tensorflow as tf
    import tf2onnx

    size = model_image_size(model)
    spec = (tf.TensorSpec([None, size, size, 3], tf.float32, name=ONNX_INPUT),)

    @tf.function(input_signature=spec)
    def embed_pixels(pixels):
        return {ONNX_OUTPUT: tf.cast(model(pixels, training=False), tf.float32)}

    try:
        with atomic.atomic_path(destination) as tmp:
            tf2onnx.convert.from_function(embed_pixels, input_signature=spec, opset=ONNX_OPSET, output_path=str(tmp))
            images = tf.constant(list(encoded), dtype=tf.string)
            loaded = load_saved_model(saved_model_dir)   # held in a name: it owns the variables it reads
            expected = loaded.embed_image_bytes(images)["embedding"].numpy()
            pixels = decode_batch(images, size).numpy()
            got = onnx_session(tmp).run([ONNX_OUTPUT], {ONNX_INPUT: pixels})[0]
            record["max_abs_diff"] = float(np.max(np.abs(got - expected)))
            if not record["max_abs_diff"] <= ONNX_TOLERANCE:
                raise ValueError(f"ONNX Runtime differs from the SavedModel by {record['max_abs_diff']:.2e} "
                                 f"(tolerance {ONNX_TOLERANCE:.0e})")
    except Exception as exc:   # an optional file: any failure leaves it out, with the reason on the card
        record["reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.warning("no %s: %s", destination.name, record["reason"])
        destination.unlink(missing_ok=True)
        return record
    record["written"] = True
    return record


class ImageEmbedder:
    """A bundle's image model over encoded images from anywhere (uploads, files, a folder of queries).

    Each image is first normalised as phase 0 normalises the collection (pipeline/data/images.py: EXIF
    orientation applied, CMYK / palette / 16-bit / alpha made 8-bit RGB, decompression bombs and non-images
    refused with a reason), so a query file gives the embedding its copy in the collection has.
    With `onnx_file` (a bundle's image_model.onnx) and onnxruntime importable, the pixels decoded by
    TensorFlow go through ONNX Runtime instead of the SavedModel; `backend` says which runs.
    """

    def __init__(self, folder: str | Path, onnx_file: str | Path | None = None, threads: int = ONNX_THREADS):
        import tensorflow as tf

        self.loaded = load_saved_model(folder)
        self.dim = int(self.loaded.signatures["serving_default"].structured_outputs["embedding"].shape[-1])
        self.endpoint = self.loaded.embed_image_bytes
        self.backend = "savedmodel"
        self.session = None
        if onnx_file is not None:
            try:
                self.session = onnx_session(onnx_file, threads)
            except ImportError as exc:
                log.warning("serving images with the SavedModel: %s present but %s", Path(onnx_file).name, exc)
        if self.session is not None:
            size = int(self.session.get_inputs()[0].shape[1])
            decode = tf.function(lambda images: decode_batch(images, size),
                                 input_signature=[tf.TensorSpec([None], tf.string)])
            session = self.session
            self.endpoint = lambda images: {"embedding": session.run([ONNX_OUTPUT],
                                                                     {ONNX_INPUT: decode(images).numpy()})[0]}
            self.backend = "onnxruntime"

    def embed(self, images: Sequence[bytes], batch_size: int = 32):
        """(vectors (n, dim) float32 — all-zero rows for images that failed —, errors {position: reason},
        normalised encoded bytes per position (None where it failed))."""
        import tensorflow as tf

        from pipeline.data.images import normalize_bytes

        vectors = np.zeros((len(images), self.dim), np.float32)
        errors: dict[int, str] = {}
        normalised: list[bytes | None] = [None] * len(images)
        for position, data in enumerate(images):
            result = normalize_bytes(bytes(data))
            if result.ok:
                normalised[position] = result.data
            else:
                errors[position] = result.reason
        good = [p for p in range(len(images)) if normalised[p] is not None]
        for first in range(0, len(good), batch_size):
            chunk = good[first:first + batch_size]
            try:
                vectors[chunk] = np.asarray(self.endpoint(tf.constant([normalised[p] for p in chunk]))["embedding"])
            except tf.errors.InvalidArgumentError:
                # One image Pillow read but TensorFlow cannot decode spoils its batch: find it alone.
                for p in chunk:
                    try:
                        vectors[p] = np.asarray(self.endpoint(tf.constant([normalised[p]]))["embedding"])[0]
                    except tf.errors.InvalidArgumentError as exc:
                        errors[p], normalised[p] = f"cannot be decoded ({exc.message.splitlines()[0]})", None
        return vectors, errors, normalised
