"""What the upload guard's multipart check costs per request, beside what the service does with the image anyway.

Run on demand (never a test):

    .venv/bin/python benchmarks/upload_guard.py

The guard (components/serving/service.py `UploadGuard`) parses each /predict body with Starlette's form parser
before BentoML parses it again, so that a body that does not parse gets a one-line 400 instead of a 500. This
prints, for real Magnetic Tile JPEGs (the line's pictures, about 40 KB) and for larger synthetic bodies, the
median time of that check and, as the baseline measured in the same run, of decoding and preprocessing the
same picture for a 224 px model (what every request does after the guard), with their ratio.
"""

from __future__ import annotations

import asyncio
import io
import statistics
import time

import numpy as np
from PIL import Image

from components.config import PACKAGE_ROOT
from components.data.images import decode
from components.serving.service import multipart_problem
from components.training.transforms import preprocess

BOUNDARY = b"defectops-bench"


def body_of(image: bytes) -> tuple[bytes, bytes]:
    """A /predict multipart body holding `image` as the `image` file field, and its content type."""
    head = (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="image"; filename="part.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n")
    return head + image + b"\r\n--" + BOUNDARY + b"--\r\n", b"multipart/form-data; boundary=" + BOUNDARY


def median_ms(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    real = sorted((PACKAGE_ROOT.parent / "shared" / "datasets" / "magnetic-tile").glob("MT_*/Imgs/*.jpg"))[:1]
    cases: list[tuple[str, bytes]] = [(f"real JPEG {path.name}", path.read_bytes()) for path in real]
    rng = np.random.default_rng(0)
    for side in (1024, 2048, 4096):  # camera frames of growing size, noise so that JPEG keeps them large
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        cases.append((f"{side}x{side} JPEG", buffer.getvalue()))
    loop = asyncio.new_event_loop()  # one loop, as the server's: not a new one per call
    print(f"{'body':<34} {'size':>9} {'guard parse':>12} {'decode+prep':>12} {'ratio':>7}")
    for name, image in cases:
        body, content_type = body_of(image)
        assert loop.run_until_complete(multipart_problem(body, content_type)) is None
        repeats = 50 if len(image) < 2**20 else 10
        guard = median_ms(lambda b=body, t=content_type: loop.run_until_complete(multipart_problem(b, t)), repeats)
        prepare = median_ms(lambda i=image: preprocess(decode(i).pixels, 224), repeats)
        print(f"{name[:34]:<34} {len(image) / 1024:>7.0f} KB {guard:>9.2f} ms {prepare:>9.2f} ms "
              f"{guard / prepare:>6.1%}")
    loop.close()

if __name__ == "__main__":
    main()
