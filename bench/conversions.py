"""What converting an upstream's JPEG to the PNG a client asked for costs, per encoder (issue 27 item 1).

Decodes a 2752x1536 JPEG (FLUX ultra's default size) and encodes it as PNG with each candidate, the
candidates taking turns, best of `--rounds`; CPU time (all threads: libvips may use several) and the
PNG's size, each as a ratio to today's Pillow figure (`imaging.encode`: Pillow, compress_level 3) in the
same run. Images: `synthetic` (colour gradients, a fractal and fine grain, smoothed: photo-like), `noise`
(1/f noise: the statistics of natural images, but barely compressible: a worst case), or `--photo PATH`
(any photograph, tiled to the size).

    .venv/bin/python -m bench.conversions [--image synthetic|noise] [--photo PATH] [--rounds 3]

pyvips (with pyvips-binary) and imagecodecs are optional here: candidates whose package is missing are
skipped (`pip install pyvips pyvips-binary imagecodecs numpy` to compare them all).
"""

import argparse
import io
import time
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

WIDTH, HEIGHT = 2752, 1536
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
Encoder = Callable[[bytes], bytes]


def synthetic(rng: np.random.Generator) -> Image.Image:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([x / WIDTH * 255, y / HEIGHT * 255, (x + y) % 512 / 2], axis=-1)
    fractal = np.asarray(Image.effect_mandelbrot((WIDTH, HEIGHT), (-2.2, -1.2, 1.0, 1.2), 100).convert("RGB"))
    pixels = 0.6 * base + 0.4 * fractal + rng.normal(0, 6, (HEIGHT, WIDTH, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.7))


def noise(rng: np.random.Generator) -> Image.Image:
    fy, fx = np.fft.fftfreq(HEIGHT)[:, None], np.fft.fftfreq(WIDTH)[None, :]
    amplitude = 1 / np.maximum(np.hypot(fy, fx), 1 / WIDTH)
    channels = []
    for _ in range(3):
        field = np.real(np.fft.ifft2(amplitude * np.exp(2j * np.pi * rng.random((HEIGHT, WIDTH)))))
        channels.append((field - field.mean()) / field.std() * 50 + 128)
    return Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))


def tiled(path: str) -> Image.Image:
    photo = Image.open(path).convert("RGB")
    canvas = Image.new("RGB", (WIDTH, HEIGHT))
    for left in range(0, WIDTH, photo.width):
        for top in range(0, HEIGHT, photo.height):
            canvas.paste(photo, (left, top))
    return canvas


def pillow(level: int) -> Encoder:
    def encode(jpeg: bytes) -> bytes:
        out = io.BytesIO()
        Image.open(io.BytesIO(jpeg)).save(out, "PNG", compress_level=level)
        return out.getvalue()

    return encode


def candidates() -> dict[str, Encoder]:
    found = {"pillow level 3 (today)": pillow(3), "pillow level 1": pillow(1), "pillow level 2": pillow(2)}
    try:
        import imagecodecs

        found["imagecodecs png level 1"] = lambda jpeg: imagecodecs.png_encode(imagecodecs.jpeg_decode(jpeg), level=1)
    except ImportError:
        pass
    try:
        import pyvips

        pyvips.cache_set_max(0)
        for level in (1, 2, 3):
            for name, flag in (("none", 8), ("sub", 16), ("up", 32), ("paeth", 128), ("adaptive", 248)):
                found[f"pyvips level {level} filter {name}"] = vips(pyvips, level, flag)
    except (ImportError, OSError):  # OSError: the package without its libvips
        pass
    return found


def vips(pyvips: object, level: int, flag: int) -> Encoder:
    def encode(jpeg: bytes) -> bytes:
        image = pyvips.Image.new_from_buffer(jpeg, "", access="sequential")  # type: ignore[attr-defined]
        return image.pngsave_buffer(compression=level, filter=flag)  # type: ignore[no-any-return]

    return encode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", choices=["synthetic", "noise"], default="synthetic")
    parser.add_argument("--photo", help="a photograph to tile to the size instead")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    picture = tiled(args.photo) if args.photo else synthetic(rng) if args.image == "synthetic" else noise(rng)
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=90)
    jpeg = buffer.getvalue()
    encoders = candidates()
    cpu: dict[str, list[float]] = {name: [] for name in encoders}
    sizes: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, encode in encoders.items():
            started = time.process_time()
            png = encode(jpeg)
            cpu[name].append(time.process_time() - started)
            assert png.startswith(PNG_SIGNATURE)
            sizes[name] = len(png)
    today = "pillow level 3 (today)"
    print(f"{WIDTH}x{HEIGHT} JPEG of {len(jpeg):,} bytes ({args.photo or args.image}) to PNG, best of {args.rounds}")
    for name in encoders:
        best, base = min(cpu[name]), min(cpu[today])
        print(f"{name:32s} {best * 1000:7.1f} ms CPU {best / base:5.2f}x   PNG {sizes[name]:>11,} bytes "
              f"{sizes[name] / sizes[today]:5.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
