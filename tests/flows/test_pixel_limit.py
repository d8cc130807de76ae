"""--max-pixels reaches every stage that decodes: an image above Pillow's default limit but below the user's
passes ingest and is embedded (it used to pass ingest and stop the embed stage)."""

from __future__ import annotations

import io

from flow_helpers import FAST
from PIL import Image
from sklearn.datasets import load_digits

from flows.curate import SourceConfig, curate
from skmm.models.clip import MAX_PIXELS
from storage.datasets import VectorTableRef
from storage.ingest import render_digit_png


def test_a_raised_pixel_limit_reaches_the_embed_stage(prefect_server, tmp_path):
    digits = load_digits()
    pool = tmp_path / "pool"
    for i in range(80):
        (pool / str(digits.target[i] % 2)).mkdir(parents=True, exist_ok=True)
        (pool / str(digits.target[i] % 2) / f"{i}.png").write_bytes(render_digit_png(digits.images[i]))
    side = 9_500  # 90.25 M pixels: above Pillow's default 89 478 485, below twice it
    assert side * side > MAX_PIXELS
    buf = io.BytesIO()
    Image.new("L", (side, side), 200).save(buf, format="PNG")
    (pool / "1" / "huge.png").write_bytes(buf.getvalue())

    result = curate(**{**FAST, "methods": ["uniform"]}, source=SourceConfig(kind="folder", path=str(pool),
                                                                        max_pixels=100_000_000),
                    store_url=str(tmp_path / "store"))
    assert result["quarantined"] == 0
    assert VectorTableRef.from_dict(result["embeddings"]).num_rows == 81  # the huge image was embedded too
