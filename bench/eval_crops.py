"""Write the evaluation crops: 256x256 pieces of the two photos held out of the default prior's
training (scikit-image's astronaut.png and coffee.png), at their native resolution.

    python bench/eval_crops.py [OUT_DIR]      (default: examples/eval)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SIZE = 256
CROPS = {  # name: (photo, top, left)
    "astronaut-face": ("astronaut", 0, 110),
    "astronaut-suit": ("astronaut", 256, 60),
    "coffee-cup": ("coffee", 20, 170),
}


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "examples" / "eval"
    out.mkdir(parents=True, exist_ok=True)
    for name, (photo, top, left) in CROPS.items():
        array = np.asarray(getattr(skimage.data, photo)())[top:top + SIZE, left:left + SIZE]
        assert array.shape[:2] == (SIZE, SIZE), name
        Image.fromarray(np.ascontiguousarray(array)).save(out / f"{name}.png")
        print(out / f"{name}.png")


if __name__ == "__main__":
    main()
