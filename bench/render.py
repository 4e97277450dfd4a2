"""Render benchmark: decode + VOI + PNG of a 512×512 CT slice, beside DCMTK and the zlib floor.

    .venv/bin/python bench/render.py [--runs N] [--file NAME] [--json PATH]

All numbers come from one run on one machine; compare the ratios, not the absolute times.
The floor is zlib at the same level on the 8-bit output bytes: no PNG can be much cheaper than
compressing its pixels once. The target (decode + VOI + PNG <= 2x the floor) is measured on a
parsed dataset; the time from the file's bytes, parsing included, is reported beside it.
"""

import argparse
import io
import platform
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "plugin"), str(ROOT / "tests"), str(ROOT / "bench")]

import pydicom  # noqa: E402

from common import per_call_ms, write_results  # noqa: E402
from corpus import find  # noqa: E402
from minipacs.render import encode_png, render  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--file", default="693_UNCI.dcm", help="a corpus file (pydicom-data)")
    parser.add_argument("--level", type=int, default=1, help="zlib level of the PNG")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    path = find(args.file)
    data = path.read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    pixels = render(ds).pixels
    window = ["+Wi", "1"] if "WindowCenter" in ds else ["+Wm"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.png"
        dcmtk = per_call_ms(lambda: subprocess.run(
            ["dcm2pnm", *window, "--write-png", str(path), str(out)], check=True),
            max(1, args.runs // 10))
    steps = {
        "read (pydicom)": per_call_ms(lambda: pydicom.dcmread(io.BytesIO(data)), args.runs),
        "decode + modality + VOI": per_call_ms(lambda: render(ds), args.runs),
        "PNG encode": per_call_ms(lambda: encode_png(pixels, args.level), args.runs),
    }
    total = per_call_ms(lambda: encode_png(render(ds).pixels, args.level), args.runs)
    from_bytes = per_call_ms(lambda: encode_png(render(pydicom.dcmread(io.BytesIO(data))).pixels,
                                                args.level), args.runs)
    floor = per_call_ms(lambda: zlib.compress(pixels.tobytes(), args.level), args.runs)
    results = {
        "file": args.file, "shape": list(pixels.shape), "zlib_level": args.level,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "steps_ms": steps, "decode_voi_png_ms": total, "from_file_bytes_ms": from_bytes,
        "zlib_floor_ms": floor, "dcm2pnm_ms": dcmtk,
        "decode_voi_png_over_zlib_floor": total / floor,
        "from_file_bytes_over_zlib_floor": from_bytes / floor,
        "from_file_bytes_over_dcm2pnm": from_bytes / dcmtk,
        "png_bytes": len(encode_png(pixels, args.level)),
        "zlib_bytes": len(zlib.compress(pixels.tobytes(), args.level)),
    }
    print(f"render benchmark: {args.file} {pixels.shape}, zlib level {args.level}, {results['date']}")
    for name, ms in steps.items():
        print(f"  {name:28s} {ms:8.3f} ms")
    print(f"  {'zlib floor (8-bit bytes)':28s} {floor:8.3f} ms")
    print(f"  {'decode + VOI + PNG':28s} {total:8.3f} ms   {total / floor:.2f}x the floor (target <= 2x)")
    print(f"  {'... from the file bytes':28s} {from_bytes:8.3f} ms   {from_bytes / floor:.2f}x the floor")
    print(f"  {'dcm2pnm (with process start)':28s} {dcmtk:8.3f} ms   ours from bytes: "
          f"{from_bytes / dcmtk:.2f}x its time")
    print(f"  PNG {results['png_bytes']} bytes, zlib alone {results['zlib_bytes']} bytes")
    write_results(args.json, results)


if __name__ == "__main__":
    main()
