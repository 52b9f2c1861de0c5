"""The I/O floor: read every safetensors file of a model directory and write it again, one file at a time.

Usage: python benchmarks/io_floor.py MODEL_DIR OUT_DIR
"""

import shutil
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file


def main(source: Path, out: Path) -> None:
    out.mkdir(parents=True)
    for file in sorted(source.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            metadata = handle.metadata()
        save_file(load_file(str(file)), str(out / file.name), metadata=metadata)
    for file in source.iterdir():
        if file.is_file() and file.suffix != ".safetensors":
            shutil.copyfile(file, out / file.name)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
