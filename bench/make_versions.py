"""A development set of originals and "generated versions" of them, made without a diffusion model.

From a folder with one sub-folder per class (the clothing set, Flowers-102), pick N originals per class and
write V versions of each by strong, varied, seeded transformations: a random resized crop (and a flip), colour
and hue shifts, blur, Pillow's stylisation filters (posterise, solarise, contour and emboss blended with the
picture, edge enhancement, a median "oil" filter, equalisation), JPEG re-compression, and a partial repaint (a
region filled from a blurred or colour-shifted copy of the image, or from another original). Each version's
`role` names its strength,
"moderate" or "radical" (as the SDXL prompts of the seed did); the originals have the role "original".

    out/originals/<class>/<file>              the originals, copied byte for byte
    out/versions/<class>/<stem>__vN.jpg       the versions
    out/manifest.csv                          path,label,text,group,role (paths relative to the manifest)

The group of an original and its versions is the original's id (`<class>/<file>`); captions come from the class
name ("a photo of a {label}"). Everything is decided by --seed (each version by its own seeded generator, so one
image's versions do not depend on the others); every file is written atomically.

    python bench/make_versions.py ../shared/data/clothing10 /tmp/clothing-versions --originals 10 --versions 4
    python run.py phase0 --source /tmp/clothing-versions/manifest.csv --split classes --ratios 0.5,0,0.5
"""
from __future__ import annotations

import argparse
import csv
import io
import random
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageEnhance, ImageFilter, ImageOps

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline.core.atomic import atomic_open, atomic_path  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
STRENGTHS = ("moderate", "radical")
# (low, high) parameter ranges per strength.
CROP_SCALE = {"moderate": (0.55, 0.85), "radical": (0.25, 0.5)}
HUE_SHIFT = {"moderate": (0.03, 0.08), "radical": (0.15, 0.5)}
ENHANCE = {"moderate": (0.75, 1.3), "radical": (0.4, 1.9)}
BLUR_RADIUS = {"moderate": (0.6, 1.5), "radical": (2.0, 4.0)}     # per 100 px of the short side
JPEG_QUALITY = {"moderate": (25, 50), "radical": (5, 15)}
REPAINT_AREA = {"moderate": (0.1, 0.2), "radical": (0.25, 0.45)}
# How many of the optional steps (blur, stylise, repaint, JPEG) a version gets.
EXTRA_STEPS = {"moderate": (1, 2), "radical": (2, 3)}


def list_classes(source: Path) -> dict[str, list[Path]]:
    classes = {}
    for folder in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if files:
            classes[folder.name] = files
    if not classes:
        raise SystemExit(f"error: no class sub-folder with images in {source}")
    return classes


def pick_originals(classes: dict[str, list[Path]], per_class: int, seed: int) -> list[tuple[str, Path]]:
    chosen = []
    for label, files in classes.items():
        files = list(files)
        random.Random(f"{seed}:originals:{label}").shuffle(files)
        chosen += [(label, f) for f in sorted(files[:per_class])]
    return chosen


# --------------------------------------------------------------------------- transformations


def crop(image: Image.Image, rng: random.Random, strength: str) -> Image.Image:
    """A random resized crop back to the image's size (area share from CROP_SCALE, aspect 3/4..4/3), maybe flipped."""
    w, h = image.size
    area = rng.uniform(*CROP_SCALE[strength]) * w * h
    aspect = rng.uniform(0.75, 1.333)
    cw, ch = min(w, max(8, round((area * aspect) ** 0.5))), min(h, max(8, round((area / aspect) ** 0.5)))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out = image.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BICUBIC)
    return ImageOps.mirror(out) if rng.random() < 0.5 else out


def colour(image: Image.Image, rng: random.Random, strength: str) -> Image.Image:
    """A hue rotation, then saturation, brightness and contrast factors."""
    hsv = image.convert("HSV")
    h, s, v = hsv.split()
    shift = int(255 * rng.uniform(*HUE_SHIFT[strength])) * rng.choice((-1, 1))
    h = h.point(lambda value: (value + shift) % 256)
    out = Image.merge("HSV", (h, s, v)).convert("RGB")
    for enhancer in (ImageEnhance.Color, ImageEnhance.Brightness, ImageEnhance.Contrast):
        out = enhancer(out).enhance(rng.uniform(*ENHANCE[strength]))
    return out


def blur(image: Image.Image, rng: random.Random, strength: str) -> Image.Image:
    radius = rng.uniform(*BLUR_RADIUS[strength]) * min(image.size) / 100
    return image.filter(ImageFilter.GaussianBlur(radius))


def stylise(image: Image.Image, rng: random.Random, strength: str) -> Image.Image:
    """One of Pillow's stylisation filters; the radical ones change the picture's look entirely."""
    if strength == "moderate":
        kind = rng.choice(("posterize", "edge_enhance", "median", "equalize"))
    else:
        kind = rng.choice(("posterize", "solarize", "contour", "emboss", "median"))
    if kind == "posterize":
        return ImageOps.posterize(image, 4 if strength == "moderate" else rng.choice((2, 3)))
    if kind == "solarize":
        return ImageOps.solarize(image, rng.randint(64, 160))
    if kind in ("contour", "emboss"):
        # Blended with the picture: alone they leave a grey relief with nothing of its colours, a change no
        # img2img version at moderate strength makes.
        drawn = image.filter(ImageFilter.CONTOUR if kind == "contour" else ImageFilter.EMBOSS)
        return Image.blend(image, drawn, rng.uniform(0.5, 0.75))
    if kind == "edge_enhance":
        return image.filter(ImageFilter.EDGE_ENHANCE_MORE)
    if kind == "median":
        size = 3 if strength == "moderate" else rng.choice((5, 7))
        return image.filter(ImageFilter.MedianFilter(size))
    return ImageOps.equalize(image)


def jpeg(image: Image.Image, rng: random.Random, strength: str) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=rng.randint(*JPEG_QUALITY[strength]))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def repaint(image: Image.Image, rng: random.Random, strength: str, donor: Image.Image) -> Image.Image:
    """A rectangle (area share from REPAINT_AREA) filled from a blurred, a colour-shifted or another image."""
    w, h = image.size
    area = rng.uniform(*REPAINT_AREA[strength]) * w * h
    aspect = rng.uniform(0.5, 2.0)
    rw, rh = min(w, max(4, round((area * aspect) ** 0.5))), min(h, max(4, round((area / aspect) ** 0.5)))
    left, top = rng.randint(0, w - rw), rng.randint(0, h - rh)
    source = rng.choice(("blurred", "shifted", "donor"))
    if source == "blurred":
        fill = image.filter(ImageFilter.GaussianBlur(max(2.0, min(w, h) / 25)))
    elif source == "shifted":
        fill = colour(image, rng, "radical")
    else:
        fill = donor.convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
    out = image.copy()
    out.paste(fill.crop((left, top, left + rw, top + rh)), (left, top))
    return out


def make_version(image: Image.Image, donor: Image.Image, strength: str, rng: random.Random) -> Image.Image:
    """Crop and colour always, then a seeded choice of blur / stylise / repaint / JPEG, in a seeded order."""
    out = colour(crop(image, rng, strength), rng, strength)
    extras = ["blur", "stylise", "repaint", "jpeg"]
    rng.shuffle(extras)
    for step in extras[:rng.randint(*EXTRA_STEPS[strength])]:
        if step == "repaint":
            out = repaint(out, rng, strength, donor)
        else:
            out = {"blur": blur, "stylise": stylise, "jpeg": jpeg}[step](out, rng, strength)
    return out


# --------------------------------------------------------------------------- the set


def write_image(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="JPEG", quality=90)


def build(source: Path, out: Path, per_class: int, versions: int, seed: int, prompt: str,
          classes_limit: int = 0) -> Path:
    """Write the originals, their versions and manifest.csv under `out`; returns the manifest's path."""
    from tqdm import tqdm

    classes = list_classes(source)
    if classes_limit:
        classes = dict(list(classes.items())[:classes_limit])
    originals = pick_originals(classes, per_class, seed)
    rows = []
    for label, file in tqdm(originals, desc="versions", unit="original", disable=None):
        group = f"{label}/{file.name}"
        target = out / "originals" / label / file.name
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(file, tmp)
        caption = prompt.format(label=label.replace("_", " ").replace("-", " "))
        rows.append([target.relative_to(out).as_posix(), label, caption, group, "original"])
        with Image.open(file) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
        # The donor of a repaint: another original, of another class where there is one.
        others = [f for lab, f in originals if lab != label] or [f for _, f in originals if f != file] or [file]
        for v in range(versions):
            rng = random.Random(f"{seed}:{group}:{v}")
            strength = STRENGTHS[v % len(STRENGTHS)]
            with Image.open(rng.choice(others)) as donor:
                version = make_version(image, donor.convert("RGB"), strength, rng)
            path = out / "versions" / label / f"{Path(file.name).stem}__v{v + 1}.jpg"
            write_image(version, path)
            rows.append([path.relative_to(out).as_posix(), label, caption, group, strength])
    manifest = out / "manifest.csv"
    with atomic_open(manifest, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "text", "group", "role"])
        writer.writerows(rows)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a folder with one sub-folder of images per class")
    parser.add_argument("out", type=Path, help="where the originals, the versions and manifest.csv go")
    parser.add_argument("--originals", type=int, default=10, help="originals per class (default 10)")
    parser.add_argument("--versions", type=int, default=4, help="versions per original (default 4)")
    parser.add_argument("--classes", type=int, default=0, help="use only the first N classes (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="a photo of a {label}", help="caption template ({label} = the class)")
    args = parser.parse_args(argv)
    if not args.source.is_dir():
        parser.error(f"source folder not found: {args.source}")
    if args.originals < 1 or args.versions < 1:
        parser.error("--originals and --versions must be at least 1")
    if "{label}" not in args.prompt:
        parser.error("--prompt must contain {label}")
    manifest = build(args.source, args.out, args.originals, args.versions, args.seed, args.prompt, args.classes)
    print(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
